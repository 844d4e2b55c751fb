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


def build_stack(stages: list[tuple[Any, dict, int]],
                value_range: tuple[float, float]) -> Callable[[tf.Tensor], tf.Tensor]:
    """A TensorFlow function batch -> augmented batch (float32, clipped to the range)
    over ``(stage, arguments, seed)`` in order."""
    layers = [kerascv_layer(stage, arguments, seed) for stage, arguments, seed in stages]

    def augment(images):
        images = tf.cast(images, tf.float32)
        for layer in layers:
            images = layer(images)
        return tf.clip_by_value(tf.convert_to_tensor(images), *value_range)

    return augment
