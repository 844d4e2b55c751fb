"""Training-time augmentation built from keras-cv layers, plus salt-and-pepper noise.

The stack runs inside the input pipeline on float32 batches with values 0-255 and
shape (batch, size, size, 1), never inside the model, so validation, evaluation and
exported models see untouched images. keras-cv layers compute with TensorFlow ops,
so they run in tf.data on any Keras backend.

    >>> augment = build_augmenter(cfg.augment, image_size=224)
    >>> batch = augment(batch)          # tf.data map or eager, same result semantics
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import keras_cv
import tensorflow as tf
from keras_cv.layers import VectorizedBaseImageAugmentationLayer

from .config import AugmentConfig

VALUE_RANGE = (0.0, 255.0)


@keras.saving.register_keras_serializable(package="boneage_keras")
class SaltAndPepper(VectorizedBaseImageAugmentationLayer):
    """Set a random fraction of pixels to black or white (half each).

    The fraction is drawn per image, uniformly from ``fraction=(low, high)``.
    """

    def __init__(self, fraction=(0.03, 0.08), value_range=VALUE_RANGE, seed=None,
                 **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.fraction = tuple(float(f) for f in fraction)
        self.value_range = tuple(float(v) for v in value_range)
        self.seed = seed

    def get_random_transformation_batch(self, batch_size, **kwargs):
        return self._random_generator.uniform(
            shape=(batch_size, 1, 1, 1), minval=self.fraction[0], maxval=self.fraction[1]
        )

    def augment_images(self, images, transformations, **kwargs):
        noise = self._random_generator.uniform(shape=tf.shape(images))
        fractions = tf.cast(transformations, images.dtype)
        low, high = self.value_range
        images = tf.where(noise < fractions / 2, tf.cast(high, images.dtype), images)
        return tf.where(noise > 1 - fractions / 2, tf.cast(low, images.dtype), images)

    def augment_labels(self, labels, transformations, **kwargs):
        return labels

    def get_config(self):
        config = super().get_config()
        config.update({"fraction": self.fraction, "value_range": self.value_range,
                       "seed": self.seed})
        return config


def build_layers(cfg: AugmentConfig, image_size: int,
                 seed: int | None = None) -> list[keras.layers.Layer]:
    """The configured keras-cv layers, in application order (empty: no augmentation)."""
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    layers: list[keras.layers.Layer] = []
    if cfg.random_crop:
        layers.append(keras_cv.layers.RandomCrop(image_size, image_size, seed=seed))
    if cfg.horizontal_flip:
        layers.append(keras_cv.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation_degrees:
        layers.append(keras_cv.layers.RandomRotation(cfg.rotation_degrees / 360.0,
                                                     seed=seed, **fill))
    if cfg.translation:
        layers.append(keras_cv.layers.RandomTranslation(cfg.translation, cfg.translation,
                                                        seed=seed, **fill))
    if cfg.scale and tuple(cfg.scale) != (1.0, 1.0):
        low, high = cfg.scale
        # keras-cv zoom factor z shows the image at scale 1/(1+z); z<0 zooms in.
        zoom = (1.0 / high - 1.0, 1.0 / low - 1.0)
        layers.append(keras_cv.layers.RandomZoom(zoom, seed=seed, **fill))
    if cfg.shear:
        layers.append(keras_cv.layers.RandomShear(cfg.shear, cfg.shear, seed=seed, **fill))
    if cfg.brightness:
        layers.append(keras_cv.layers.RandomBrightness(cfg.brightness,
                                                       value_range=VALUE_RANGE, seed=seed))
    if cfg.contrast and tuple(cfg.contrast) != (1.0, 1.0):
        low, high = cfg.contrast
        layers.append(keras_cv.layers.RandomContrast(VALUE_RANGE, (1.0 - low, high - 1.0),
                                                     seed=seed))
    if cfg.blur_probability:
        blur = keras_cv.layers.RandomGaussianBlur(kernel_size=5, factor=(0.1, 1.5),
                                                  seed=seed)
        layers.append(keras_cv.layers.RandomApply(blur, rate=cfg.blur_probability,
                                                  seed=seed))
    if cfg.salt_pepper and cfg.salt_pepper[1] > 0:
        layers.append(SaltAndPepper(tuple(cfg.salt_pepper), seed=seed))
    return layers


def build_augmenter(cfg: AugmentConfig, image_size: int,
                    seed: int | None = None) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """A function batch -> augmented batch (float32, 0-255), or None if all stages are off.

    Geometric stages fill uncovered pixels with black, like the radiograph background.
    """
    layers = build_layers(cfg, image_size, seed)
    if not layers:
        return None

    def augment(images):
        images = tf.cast(images, tf.float32)
        for layer in layers:
            images = layer(images)
        return tf.clip_by_value(tf.convert_to_tensor(images), *VALUE_RANGE)

    return augment
