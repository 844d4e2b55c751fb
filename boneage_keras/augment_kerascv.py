"""The ``keras-cv`` augmentation engine: keras-cv layers on TensorFlow ops.

Imported only when that engine is used (``augment.py`` holds the table of stages and
their arguments); this is the one module of the package that imports keras-cv.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras_cv
import tensorflow as tf
from keras_cv.layers import VectorizedBaseImageAugmentationLayer

from .backend import sublayers


class SaltAndPepperTF(VectorizedBaseImageAugmentationLayer):
    """Salt-and-pepper noise as a keras-cv layer (same meaning as
    ``augment.SaltAndPepper``): a fraction drawn per image from ``fraction``, half of
    the hit pixels white, half black."""

    def __init__(self, fraction=(0.03, 0.08), value_range=(0.0, 255.0), seed=None,
                 **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.fraction = tuple(float(f) for f in fraction)
        self.value_range = tuple(float(v) for v in value_range)

    def get_random_transformation_batch(self, batch_size, **kwargs):
        return self._random_generator.uniform(
            shape=(batch_size, 1, 1, 1), minval=self.fraction[0], maxval=self.fraction[1])

    def augment_images(self, images, transformations, **kwargs):
        noise = self._random_generator.uniform(shape=tf.shape(images))
        fractions = tf.cast(transformations, images.dtype)
        low, high = self.value_range
        images = tf.where(noise < fractions / 2, tf.cast(high, images.dtype), images)
        return tf.where(noise > 1 - fractions / 2, tf.cast(low, images.dtype), images)

    def augment_labels(self, labels, transformations, **kwargs):
        return labels


def kerascv_layer(stage: Any, arguments: dict, seed: int) -> Any:
    """The keras-cv layer of one stage of ``augment.STAGES``."""
    if stage.layer == "SaltAndPepper":
        return SaltAndPepperTF(seed=seed, **arguments)
    if stage.layer == "RandomGaussianBlur":
        # keras-cv: factor = sigma range; the probability is a RandomApply around it
        blur = keras_cv.layers.RandomGaussianBlur(kernel_size=arguments["kernel_size"],
                                                  factor=arguments["sigma"], seed=seed)
        return keras_cv.layers.RandomApply(blur, rate=arguments["probability"],
                                           seed=seed + 1)
    return getattr(keras_cv.layers, stage.layer)(seed=seed, **arguments)


class GeneratorUniform(keras_cv.core.FactorSampler):
    """A uniform factor sampler drawing from a generator of its own. keras-cv's
    ``UniformFactorSampler`` (shear, brightness, contrast, blur sigma) draws with
    ``tf.random.uniform``, from TensorFlow's global state, which no seed per batch can
    reach; each one is replaced by this, with the same range. Its state is set before
    every batch (:func:`_reseed`), so its initial seed does not matter."""

    def __init__(self, lower: float, upper: float) -> None:
        self.lower, self.upper = lower, upper
        self.generator = tf.random.Generator.from_seed(0)

    def __call__(self, shape=(), dtype="float32"):
        return self.generator.uniform(shape, minval=self.lower, maxval=self.upper,
                                      dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        return {"lower": self.lower, "upper": self.upper}


def _take_generators(layers: list[Any]) -> list[tf.random.Generator]:
    """Replace the uniform factor samplers of ``layers`` and their sublayers (RandomApply
    wraps the blur layer) with :class:`GeneratorUniform` ones, and return every random
    generator they then draw from, in a fixed order."""
    found: list[tf.random.Generator] = []
    for layer in layers:
        for sub in [layer, *sublayers(layer)]:
            for name, value in sorted(vars(sub).items()):
                if isinstance(value, keras_cv.core.UniformFactorSampler):
                    value = GeneratorUniform(value.lower, value.upper)
                    setattr(sub, name, value)
                generator = value.generator if isinstance(value, GeneratorUniform) else value
                if isinstance(generator, tf.random.Generator) and all(
                        generator is not g for g in found):
                    found.append(generator)
    return found


def _reseed(generators: list[tf.random.Generator], seed: tf.Tensor) -> None:
    """Set every generator's state from ``seed`` (int64, shape [2]) and its place: the
    draws that follow depend on ``seed`` alone, not on what was drawn before."""
    for index, generator in enumerate(generators):
        key = tf.cast(tf.random.experimental.stateless_fold_in(seed, index), tf.int64)
        size = int(generator.state.shape[0])
        generator.reset(tf.concat([tf.zeros([size - 2], tf.int64), key[::-1]], 0))


def build_stack(stages: list[tuple[Any, dict, int]],
                value_range: tuple[float, float]) -> Callable[[tf.Tensor, tf.Tensor],
                                                              tf.Tensor]:
    """A TensorFlow function (batch, seed) -> augmented batch (float32, clipped to the
    range) over ``(stage, arguments, seed)`` in order.

    keras-cv layers draw from stateful generators, shared by every call: before each
    batch they are set from its ``seed`` (int64, shape [2]), so a batch's draws do not
    depend on how many batches were drawn before (an iterator that Keras opens and
    drops to look at the first batch, or threads racing). Calls must not overlap: the
    tf.data map that calls this runs one call at a time, PyDataset workers take a lock.
    """
    layers = [kerascv_layer(stage, arguments, seed) for stage, arguments, seed in stages]
    generators = _take_generators(layers)

    def augment(images, seed):
        _reseed(generators, seed)
        images = tf.cast(images, tf.float32)
        for layer in layers:
            images = layer(images)
        return tf.clip_by_value(tf.convert_to_tensor(images), *value_range)

    return augment
