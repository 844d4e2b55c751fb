"""Training-time augmentation from the config, on one of three engines.

One table (``STAGES``) maps each ``augment`` config key to its layer and to the layer's
arguments, in application order; every engine builds from it, so a key means the same
on each (rotation in degrees, brightness as a fraction of the 0-255 range, ...):

* ``keras-cv`` (the default where TensorFlow is installed): keras-cv layers,
  TensorFlow ops, run inside the tf.data pipeline (or a PyDataset through ``tf.function``). Needs TensorFlow.
* ``keras``: Keras 3 core preprocessing layers (``keras.layers.RandomFlip``, ...) plus
  our :class:`SaltAndPepper` on ``keras.random``, computed by the active backend (torch,
  JAX or TensorFlow) on the CPU, in the PyDataset's worker threads. No TensorFlow.
* ``numpy``: every stage in NumPy (``augment_numpy.py``), the geometric ones fused into
  one warp per image, in the PyDataset's worker threads. No TensorFlow, no framework.

``augment.engine: auto`` picks ``keras-cv`` where TensorFlow and keras-cv import, else
``numpy`` (seven times faster than ``keras`` for the ResNet18 study's eight stages).
Every layer gets its own seed, derived from ``train.seed`` and the layer's place in the
table, so the layers' random draws are independent (one shared seed would tie them: a
flipped image would always rotate the same way). Every engine draws each batch from a
seed of its own, so augmentation is reproducible whatever the threads' timing: the
``keras`` and ``numpy`` engines and keras-cv in a PyDataset from (epoch, batch),
keras-cv in tf.data from a seeded random stream that the pipeline pairs with its
batches. A resumed run continues with new draws.

Images are float32 batches (batch, size, size, 1) with values 0-255; geometric stages
fill uncovered pixels with black, like the radiograph background. Augmentation never
runs inside the model: validation, evaluation and exported models see untouched images.

    >>> augmenter = build_augmenter(cfg.augment, image_size=224, seed=42, engine="keras")
    >>> batch = augmenter.augment_batch(images, epoch=0, batch=7)     # numpy in and out
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from .backend import importable, tensorflow_for_input
from .config import AugmentConfig, ConfigError
from .extras import install_hint

VALUE_RANGE = (0.0, 255.0)
ENGINES = ("keras-cv", "keras", "numpy")
FILL = {"fill_mode": "constant", "fill_value": 0.0}
BLUR_KERNEL = 5
BLUR_SIGMA = (0.1, 1.5)


def tensorflow_available() -> bool:
    """Whether TensorFlow and keras-cv can be imported here (without importing them)."""
    return importable("tensorflow", "keras_cv")


def resolve_engine(engine: str) -> str:
    """``auto`` -> ``keras-cv`` where TensorFlow is importable, else ``numpy``; an
    explicit ``keras-cv`` without TensorFlow is a clear error."""
    if engine == "auto":
        return "keras-cv" if tensorflow_available() else "numpy"
    if engine == "keras-cv" and not tensorflow_available():
        raise ConfigError("config key 'augment.engine': 'keras-cv' needs TensorFlow and "
                          "keras-cv, which are not installed here: "
                          f"{install_hint('tensorflow')}, or set augment.engine=numpy.")
    if engine not in ENGINES:
        raise ConfigError(f"config key 'augment.engine': got {engine!r}, expected auto, "
                          + " or ".join(ENGINES) + ".")
    return engine


def layer_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from non-negative integers (seed, stage, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]
               & 0x7FFFFFFF)


@keras.saving.register_keras_serializable(package="boneage_keras")
class SaltAndPepper(keras.layers.Layer):
    """Set a random fraction of pixels to black or white (half each), with
    ``keras.random`` on any backend. The fraction is drawn per image, uniformly from
    ``fraction=(low, high)``."""

    def __init__(self, fraction=(0.03, 0.08), value_range=VALUE_RANGE, seed=None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fraction = tuple(float(f) for f in fraction)
        self.value_range = tuple(float(v) for v in value_range)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = ops.shape(images)
        fractions = keras.random.uniform((shape[0], 1, 1, 1), self.fraction[0],
                                         self.fraction[1], seed=self.generator,
                                         dtype=images.dtype)
        noise = keras.random.uniform(shape, seed=self.generator, dtype=images.dtype)
        low, high = self.value_range
        images = ops.where(noise < fractions / 2, ops.cast(high, images.dtype), images)
        return ops.where(noise > 1 - fractions / 2, ops.cast(low, images.dtype), images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fraction": self.fraction,
                "value_range": self.value_range, "seed": self.seed}


# --- the table: config key -> layer arguments (None: stage off) ----------------------


def _random_crop(cfg: AugmentConfig, size: int) -> dict | None:
    return {"height": size, "width": size} if cfg.random_crop else None


def _flip(cfg: AugmentConfig, size: int) -> dict | None:
    return {"mode": "horizontal"} if cfg.horizontal_flip else None


def _rotation(cfg: AugmentConfig, size: int) -> dict | None:
    # every engine: factor is a fraction of a full turn, angle in [-factor, factor]
    return {"factor": cfg.rotation_degrees / 360.0, **FILL} if cfg.rotation_degrees else None


def _translation(cfg: AugmentConfig, size: int) -> dict | None:
    t = cfg.translation
    return {"height_factor": t, "width_factor": t, **FILL} if t else None


def _zoom(cfg: AugmentConfig, size: int) -> dict | None:
    if not cfg.scale or tuple(cfg.scale) == (1.0, 1.0):
        return None
    low, high = cfg.scale
    # zoom factor z shows the image at scale 1/(1+z): z < 0 zooms in
    return {"height_factor": (1.0 / high - 1.0, 1.0 / low - 1.0), **FILL}


def _shear(cfg: AugmentConfig, size: int) -> dict | None:
    return {"x_factor": cfg.shear, "y_factor": cfg.shear, **FILL} if cfg.shear else None


def _brightness(cfg: AugmentConfig, size: int) -> dict | None:
    # additive: delta = factor * 255, factor uniform in [-brightness, brightness]
    return {"factor": cfg.brightness, "value_range": VALUE_RANGE} if cfg.brightness else None


def _contrast(cfg: AugmentConfig, size: int) -> dict | None:
    if not cfg.contrast or tuple(cfg.contrast) == (1.0, 1.0):
        return None
    low, high = cfg.contrast
    return {"factor": (1.0 - low, high - 1.0), "value_range": VALUE_RANGE}


def _blur(cfg: AugmentConfig, size: int) -> dict | None:
    p = cfg.blur_probability
    return {"probability": p, "kernel_size": BLUR_KERNEL, "sigma": BLUR_SIGMA} if p else None


def _salt_pepper(cfg: AugmentConfig, size: int) -> dict | None:
    sp = cfg.salt_pepper
    return {"fraction": tuple(sp), "value_range": VALUE_RANGE} if sp and sp[1] > 0 else None


@dataclass(frozen=True)
class Stage:
    key: str                                            # augment.<key> in the config
    layer: str                                          # class name in keras-cv and Keras
    arguments: Callable[[AugmentConfig, int], dict | None]


STAGES = (
    Stage("random_crop", "RandomCrop", _random_crop),
    Stage("horizontal_flip", "RandomFlip", _flip),
    Stage("rotation_degrees", "RandomRotation", _rotation),
    Stage("translation", "RandomTranslation", _translation),
    Stage("scale", "RandomZoom", _zoom),
    Stage("shear", "RandomShear", _shear),
    Stage("brightness", "RandomBrightness", _brightness),
    Stage("contrast", "RandomContrast", _contrast),
    Stage("blur_probability", "RandomGaussianBlur", _blur),
    Stage("salt_pepper", "SaltAndPepper", _salt_pepper),
)


def active_stages(cfg: AugmentConfig, image_size: int) -> list[tuple[int, Stage, dict]]:
    """(table index, stage, arguments) of every stage the config switches on."""
    out = []
    for index, stage in enumerate(STAGES):
        arguments = stage.arguments(cfg, image_size)
        if arguments is not None:
            out.append((index, stage, arguments))
    return out


def keras_layer(stage: Stage, arguments: dict, seed: int) -> keras.layers.Layer:
    """The Keras 3 core layer of a stage (float32 whatever the global dtype policy)."""
    if stage.layer == "SaltAndPepper":
        return SaltAndPepper(seed=seed, dtype="float32", **arguments)
    if stage.layer == "RandomGaussianBlur":
        # Keras: factor = range of the probability to blur, sigma = blur strength
        p = arguments["probability"]
        return keras.layers.RandomGaussianBlur(
            factor=(p, p), kernel_size=arguments["kernel_size"], sigma=arguments["sigma"],
            value_range=VALUE_RANGE, seed=seed, dtype="float32")
    return getattr(keras.layers, stage.layer)(seed=seed, dtype="float32", **arguments)


class Augmenter:
    """The configured stages on one engine.

    ``augment_batch(images, epoch, batch)`` (numpy in, numpy out) is what a PyDataset
    worker calls; ``tf_function`` (keras-cv only) is what a tf.data map calls.
    ``seed`` and ``start_epoch`` seed the layers: a resumed run passes the epoch it
    starts at, so its draws differ from those of the epochs before it.
    """

    def __init__(self, cfg: AugmentConfig, image_size: int, engine: str, seed: int,
                 start_epoch: int = 0) -> None:
        self.engine = engine
        self.seed = seed
        self.device: str | None = "cpu"   # keras engine; None: the backend's default
        self._local = threading.local()
        self._lock = threading.Lock()
        self.stages = active_stages(cfg, image_size)
        self.tf_function: Callable | None = None
        self._traced: Callable | None = None
        self._numpy: Callable | None = None
        if engine == "numpy":
            from .augment_numpy import build_numpy_stack

            self._numpy = build_numpy_stack([(stage, arguments)
                                             for _, stage, arguments in self.stages],
                                            VALUE_RANGE)
        if engine == "keras-cv":
            tensorflow_for_input()      # quietly, and off the GPU, before keras-cv
            from .augment_kerascv import build_stack

            self.tf_function = build_stack(
                [(stage, arguments, layer_seed(seed, start_epoch, index))
                 for index, stage, arguments in self.stages], VALUE_RANGE)

    @property
    def keys(self) -> list[str]:
        return [stage.key for _, stage, _ in self.stages]

    def keras_layers(self, epoch: int, batch: int) -> list[keras.layers.Layer]:
        """Fresh Keras-engine layers seeded from (seed, epoch, batch, stage)."""
        return [keras_layer(stage, arguments, layer_seed(self.seed, epoch, batch, index))
                for index, stage, arguments in self.stages]

    def seeded_layers(self, epoch: int, batch: int) -> list[keras.layers.Layer]:
        """The Keras-engine layers of this thread, built once, with every seed generator
        set back to the state a fresh layer seeded from (seed, epoch, batch, stage) has:
        the same draws as :meth:`keras_layers` without building layers per batch
        (experiments/2026-11-27-augmentation-engines.md). One set per thread: PyDataset
        workers augment concurrently."""
        built = getattr(self._local, "layers", None)
        if built is None:
            layers = self.keras_layers(epoch, batch)
            generators = [[g for g in vars(layer).values()
                           if isinstance(g, keras.random.SeedGenerator)] for layer in layers]
            self._local.layers = (layers, generators)
            return layers
        layers, generators = built
        for (index, _, _), layer_generators in zip(self.stages, generators):
            state = [layer_seed(self.seed, epoch, batch, index), 0]
            for g in layer_generators:
                g.state.assign(ops.convert_to_tensor(state, dtype=g.state.dtype))
        return layers

    def augment_batch(self, images: np.ndarray, epoch: int = 0, batch: int = 0) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if self.engine == "keras-cv":
            import tensorflow as tf

            with self._lock:    # the layers' generators are shared: one batch at a time
                if self._traced is None:
                    specs = [tf.TensorSpec([None, None, None, 1], tf.float32),
                             tf.TensorSpec([2], tf.int64)]
                    self._traced = tf.function(self.tf_function, input_signature=specs)
                seed = tf.constant([layer_seed(self.seed, epoch, batch), 0], tf.int64)
                return self._traced(images, seed).numpy()
        if self._numpy is not None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, batch]))
            return self._numpy(images, rng)
        with keras.device(self.device) if self.device else contextlib.nullcontext():
            x = ops.convert_to_tensor(images)
            for layer in self.seeded_layers(epoch, batch):
                x = layer(x, training=True)
            return np.asarray(ops.convert_to_numpy(ops.clip(x, *VALUE_RANGE)), np.float32)


def build_augmenter(cfg: AugmentConfig, image_size: int, seed: int = 0,
                    engine: str | None = None, start_epoch: int = 0) -> Augmenter | None:
    """The augmenter for ``cfg`` (engine from ``cfg.engine`` unless given), or None if
    every stage is off."""
    if not active_stages(cfg, image_size):
        return None
    return Augmenter(cfg, image_size, resolve_engine(engine or cfg.engine), seed,
                     start_epoch)
