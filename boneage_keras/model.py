"""The bone-age regressor: gray image (and optionally sex) in, months out.

    image (S, S, 1) uint8-valued float 0-255
      -> GrayPreprocess   repeat to 3 channels + the backbone's ImageNet normalisation
      -> backbone         ResNet50 (default), ResNet18 (ours; model.width scales its
                          channels, model.stem_pool: false drops the stem's max-pool,
                          model.stem_stride: 1 runs the stem conv on every pixel,
                          model.sex_film: every stage scaled and shifted per
                          channel by sex, SexFiLM, model.squeeze_excite: every
                          block's channels gated, model.zero_init_residual: blocks
                          start as their shortcuts, model.avg_down: shortcuts
                          average 2x2 before striding), EfficientNetB0, InceptionV3
      -> global average pooling                         model.pooling: attention
                                                        (ResNet18): 4 learned spatial
                                                        weightings, AttentionPool;
                                                        gem: a learned power mean,
                                                        GeMPool
      [-> concat with Dense(16, relu)(male)]            when model.use_sex
      -> Dense(256, relu) -> Dropout(0.3)               head_units=0: no hidden layer
                                                        (activation: model.head_activation)
      -> Dense(1) -> LabelScale (x * std + mean)        float32 months
      or, when model.age_distribution:
      -> Dense(K) -> Softmax -> AgeExpectation          K 1-month bins over
                                                        data.age_range; their mean age
      or, when model.ordinal (CORAL):
      -> Dense(1) -> OrdinalThresholds -> OrdinalAge    the score against K-1
                                                        thresholds; the lowest bin + the
                                                        sum of P(older than each)

Grayscale and ImageNet weights: the gray channel is repeated three times, so the
pretrained first convolution sees exactly what it was trained on (a gray photo) and
the backbone's own ImageNet preprocessing applies unchanged. Preprocessing lives in the
model, so every saved model carries it; ``GrayPreprocess`` also records how images
were prepared (``image_size``, ``resize``, ``crop_hand``, ``random_crop``: the config's
names) for ``predict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
from keras import layers, ops

# the module, not its names: backend may be mid-import when Keras' import hook
# (boneage_keras/__init__.py) imports this module
from . import backend
from .config import Config
from .errors import BoneAgeError
from .images import geometry_name
from .inputs import IMAGE, SEX, model_inputs

IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# backbone name -> (keras.applications constructor name or None, normalisation mode)
BACKBONE_SPECS = {
    "resnet50": ("ResNet50", "caffe"),
    "efficientnetb0": ("EfficientNetB0", "raw"),
    "inceptionv3": ("InceptionV3", "tf"),
    "resnet18": (None, "torch"),
}


class WeightsError(BoneAgeError, RuntimeError):
    """Pretrained weights cannot be loaded; the message says what to use instead."""


@keras.saving.register_keras_serializable(package="boneage_keras")
class GrayPreprocess(layers.Layer):
    """Gray 0-255 -> three channels normalised as the backbone expects.

    ``mode``: ``caffe`` (mean subtraction, ResNet50), ``tf`` (scale to -1..1),
    ``torch`` (0..1 then ImageNet mean/std), ``raw`` (unchanged; the backbone
    normalises itself). The other arguments only record how images were prepared, under
    the config's names; files written before these names (``crop``, ``resize`` with a
    ``hand+`` prefix) load the same.
    """

    def __init__(self, mode: str = "caffe", image_size: int = 224, resize: str = "pad",
                 crop_hand: bool = False, random_crop: bool = False,
                 standardize: bool = False, **kwargs: Any) -> None:
        random_crop = kwargs.pop("crop", random_crop)
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch", "raw"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        if resize.startswith("hand+"):
            crop_hand, resize = True, resize.removeprefix("hand+")
        self.mode, self.image_size, self.resize = mode, image_size, resize
        self.crop_hand, self.random_crop = bool(crop_hand), bool(random_crop)
        self.standardize = standardize

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.standardize:
            # each image to mean 128, std 64: scans differ widely in exposure
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            std = ops.std(x, axis=(1, 2, 3), keepdims=True)
            x = ops.clip((x - mean) / (std + 1.0) * 64.0 + 128.0, 0.0, 255.0)
        x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "caffe":
            return x - ops.convert_to_tensor(IMAGENET_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode, "image_size": self.image_size,
                "resize": self.resize, "crop_hand": self.crop_hand,
                "random_crop": self.random_crop, "standardize": self.standardize}


@keras.saving.register_keras_serializable(package="boneage_keras")
class LabelScale(layers.Layer):
    """``x * std + mean``: the head predicts a standardised age, the model returns months.

    Starting at the training mean makes early epochs useful and keeps the MAE loss's
    gradients well scaled.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean, self.std = float(mean), float(std)

    def call(self, x):
        return ops.cast(x, "float32") * self.std + self.mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="boneage_keras")
class AgeExpectation(layers.Layer):
    """Probabilities over 1-month age bins ``low``, ``low + 1``, ..., ``high`` months ->
    their expected age in months, shape (batch, 1)."""

    def __init__(self, low: int = 0, high: int = 240, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low, self.high = int(low), int(high)

    def call(self, probs):
        centers = ops.arange(self.low, self.high + 1, dtype="float32")
        return ops.sum(ops.cast(probs, "float32") * centers, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high}


@keras.saving.register_keras_serializable(package="boneage_keras")
class OrdinalThresholds(layers.Layer):
    """CORAL's rank-consistent logits (Cao et al. 2020): one score per image (batch, 1)
    plus a learned bias per threshold ``low + 0.5``, ..., ``high - 0.5`` months ->
    (batch, high - low) logits of "older than the threshold". One shared score keeps
    the probabilities falling with the threshold whenever the biases do. The biases
    start at a logistic fit of a normal age distribution (``label_mean``,
    ``label_std``), so that an untrained model predicts about the mean."""

    def __init__(self, low: int = 0, high: int = 240, label_mean: float = 120.0,
                 label_std: float = 40.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low, self.high = int(low), int(high)
        self.label_mean, self.label_std = float(label_mean), float(label_std)

    def build(self, input_shape) -> None:
        thresholds = np.arange(self.low, self.high, dtype="float32") + 0.5
        self.bias = self.add_weight(shape=(self.high - self.low,), initializer="zeros",
                                    name="bias")
        self.bias.assign(1.702 * (self.label_mean - thresholds) / self.label_std)

    def call(self, score):
        return ops.cast(score, "float32") + self.bias[None, :]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.high - self.low)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high,
                "label_mean": self.label_mean, "label_std": self.label_std}


@keras.saving.register_keras_serializable(package="boneage_keras")
class OrdinalAge(layers.Layer):
    """CORAL logits (batch, high - low) -> ``low`` + the sum of their probabilities:
    the expected age in months when each threshold is a month apart, shape (batch, 1)."""

    def __init__(self, low: int = 0, high: int = 240, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low, self.high = int(low), int(high)

    def call(self, logits):
        probs = ops.sigmoid(ops.cast(logits, "float32"))
        return self.low + ops.sum(probs, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high}


def distribution_bins(cfg: Config) -> tuple[int, int]:
    """The first and last 1-month bin of ``model.age_distribution``: data.age_range
    widened to whole months."""
    low, high = cfg.data.age_range
    return math.floor(low), math.ceil(high)


@keras.saving.register_keras_serializable(package="boneage_keras")
class BatchNorm(layers.BatchNormalization):
    """Keras' ``BatchNormalization`` (same variables, arguments and results), computed
    on torch by one fused op per direction (:func:`backend.fused_batch_norm`); on JAX
    and TensorFlow it is Keras' own. The backbones use it in place of Keras' layer."""

    def call(self, inputs, training=None, mask=None):
        fused = None if mask is not None else backend.fused_batch_norm(self, inputs,
                                                                         training)
        return super().call(inputs, training, mask) if fused is None else fused


@keras.saving.register_keras_serializable(package="boneage_keras")
class Conv(layers.Conv2D):
    """Keras' ``Conv2D`` (same variables, arguments and results), computed on torch
    without the layout copies around the convolution
    (:func:`backend.channels_last_conv2d`); on JAX and TensorFlow it is Keras' own. The
    backbones use it in place of Keras' layer."""

    def build(self, input_shape):
        super().build(input_shape)
        backend.channels_last_kernel(self)

    def call(self, inputs):
        fast = backend.channels_last_conv2d(self, inputs)
        return super().call(inputs) if fast is None else fast


@keras.saving.register_keras_serializable(package="boneage_keras")
class MaxPool(layers.MaxPooling2D):
    """Keras' ``MaxPooling2D`` (same arguments and results), computed on torch in
    channels-last memory (:func:`backend.channels_last_max_pool2d`); on JAX and
    TensorFlow it is Keras' own."""

    def call(self, inputs):
        fast = backend.channels_last_max_pool2d(self, inputs)
        return super().call(inputs) if fast is None else fast


@keras.saving.register_keras_serializable(package="boneage_keras")
class SexFiLM(layers.Layer):
    """Feature-wise linear modulation by sex (FiLM, Perez et al. 2018): every channel
    of a feature map scaled and shifted by amounts learned for each sex,
    ``x * (1 + gamma(male)) + beta(male)``, with gamma and beta linear in ``male`` (0
    girl, 1 boy). Zero-initialised: an untrained layer passes the map unchanged.
    Called on ``[feature_map (B, H, W, C), male (B, 1)]``."""

    def build(self, input_shape):
        channels = input_shape[0][-1]
        self.kernel = self.add_weight(shape=(1, 2 * channels), initializer="zeros",
                                      name="kernel")
        self.bias = self.add_weight(shape=(2 * channels,), initializer="zeros",
                                    name="bias")

    def call(self, inputs):
        x, male = inputs
        male = ops.cast(ops.reshape(male, (-1, 1)), self.kernel.dtype)
        gamma, beta = ops.split(ops.matmul(male, self.kernel) + self.bias, 2, axis=-1)
        gamma = ops.cast(gamma[:, None, None, :], x.dtype)
        beta = ops.cast(beta[:, None, None, :], x.dtype)
        return x * (1.0 + gamma) + beta

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@keras.saving.register_keras_serializable(package="boneage_keras")
class AttentionPool(layers.Layer):
    """Attention pooling: ``heads`` learned spatial weightings of a feature map, each a
    softmax over its positions of a 1x1 projection of the channels, and the map's
    channels averaged under each; returns (B, heads * C). Where global average pooling
    gives a feature's mean over the whole hand, each head can weigh the regions it
    reads (the growth plates of some bones) above the rest. Zero-initialised: an
    untrained layer weighs every position alike, so each head returns the global
    average."""

    def __init__(self, heads: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(shape=(channels, self.heads), initializer="zeros",
                                      name="kernel")
        self.bias = self.add_weight(shape=(self.heads,), initializer="zeros", name="bias")

    def _positions(self, x):
        """``x`` (B, H, W, C) as (B, H*W, C) in the weights' dtype."""
        shape = ops.shape(x)
        return ops.reshape(ops.cast(x, self.kernel.dtype),
                           (shape[0], shape[1] * shape[2], shape[3]))

    def _weights(self, flat):
        return ops.softmax(ops.matmul(flat, self.kernel) + self.bias, axis=1)

    def attention(self, x):
        """Each head's weights over the positions of ``x`` (B, H, W, C): (B, H*W, heads),
        summing to 1 over the positions, in float32."""
        return self._weights(self._positions(x))

    def call(self, x):
        shape = ops.shape(x)
        flat = self._positions(x)                                           # (B, N, C)
        pooled = ops.matmul(ops.transpose(self._weights(flat), (0, 2, 1)), flat)  # (B, K, C)
        return ops.cast(ops.reshape(pooled, (shape[0], self.heads * shape[3])), x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.heads * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


@keras.saving.register_keras_serializable(package="boneage_keras")
class GeMPool(layers.Layer):
    """Generalized-mean pooling (Radenovic et al. 2019): each channel of a feature map
    (B, H, W, C) becomes ``mean(x ** p) ** (1 / p)`` over its positions, with one
    learned exponent ``p`` (from ``p``, 3 by default): at 1 the global average, growing
    towards the maximum, so the network learns how much a few strongly responding
    positions (one growth plate) count against the whole hand. Values are clipped
    at ``eps`` (the map is a ReLU's output) and pooled in float32, each channel
    scaled by its maximum first (no overflow at a large ``p``). The exponent is used
    at 1 or more: below, the pool would lean towards the minimum, and near 0 it has
    no value."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.initial_p, self.eps = float(p), float(eps)

    def build(self, input_shape):
        self.p = self.add_weight(shape=(1,), name="p",
                                 initializer=keras.initializers.Constant(self.initial_p))

    def call(self, x):
        p = ops.maximum(ops.cast(self.p, "float32"), 1.0)
        x32 = ops.maximum(ops.cast(x, "float32"), self.eps)
        # each channel over its maximum first: mean((x / m) ** p) ** (1 / p) * m is the
        # same number, and x ** p cannot overflow at a large p
        powered = ops.power(x32 / ops.max(x32, axis=(1, 2), keepdims=True), p)
        pooled = ops.power(ops.mean(powered, axis=(1, 2)), 1.0 / p) * \
            ops.max(x32, axis=(1, 2))   # (not a squeeze of the above: ONNX wants one axis)
        return ops.cast(pooled, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.initial_p, "eps": self.eps}


def with_fused_layers(model: keras.Model) -> keras.Model:
    """``model`` (a functional model, nested ones included) with every Keras
    ``BatchNormalization`` replaced by :class:`BatchNorm`, every ``Conv2D`` by
    :class:`Conv` and every ``MaxPooling2D`` by :class:`MaxPool`, weights kept."""
    def swap(layer):
        if type(layer) is layers.BatchNormalization:
            return BatchNorm.from_config(layer.get_config())
        if type(layer) is layers.Conv2D:
            return Conv.from_config(layer.get_config())
        if type(layer) is layers.MaxPooling2D:
            return MaxPool.from_config(layer.get_config())
        if isinstance(layer, keras.Model):
            return with_fused_layers(layer)
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=swap)
    clone.set_weights(model.get_weights())
    return clone


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True,
             zero_gamma: bool = False):
    x = Conv(filters, kernel, strides=stride, padding="same", use_bias=False,
             name=f"{name}_conv")(x)
    x = BatchNorm(momentum=0.9, epsilon=1e-5, name=f"{name}_bn",
                  gamma_initializer="zeros" if zero_gamma else "ones")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _squeeze_excite(x, filters: int, name: str):
    gate = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    gate = layers.Dense(max(4, filters // 4), activation="relu", name=f"{name}_se_reduce")(gate)
    gate = layers.Dense(filters, activation="sigmoid", name=f"{name}_se_expand")(gate)
    return layers.Multiply(name=f"{name}_se")([x, gate])


def resnet18(input_shape: tuple[int, int, int], width: float = 1.0,
             stem_pool: bool = True, stem_stride: int = 2,
             sex_film: bool = False, pooling: str = "avg",
             squeeze_excite: bool = False,
             zero_init_residual: bool = False, avg_down: bool = False) -> keras.Model:
    """ResNet18 (He et al. 2016, basic blocks [2, 2, 2, 2]) without its top, pooled.

    Keras ships no ResNet18; this compact definition matches torchvision's layout
    (including its batch-norm momentum, 0.1 there = 0.9 in Keras). ``width`` scales
    every layer's channels (64-128-256-512 at 1.0; 0.5: 32-64-128-256, about a quarter
    of the multiply-adds and parameters). ``stem_pool=False`` drops the stem's 3x3
    stride-2 max-pool, the usual change for small images: every stage then works at twice
    the resolution (96 px: 48-24-12-6 instead of 24-12-6-3), for about 4x the
    multiply-adds, with the same weights. ``stem_stride=1`` runs the stem's 7x7
    convolution on every pixel and leaves the halving to the max-pool: with the pool,
    the stages work at the same resolution as ``stride 2`` without it (96 px: 48-24-12-6),
    the stem at 4x its multiply-adds, again with the same weights. ``sex_film=True``
    makes the patient's sex an input of every stage: the backbone takes
    ``[image, male]`` and each stage's output passes a :class:`SexFiLM`.
    ``pooling="attention"`` replaces the global average pooling by
    :class:`AttentionPool` (4 heads: 4x the features), ``pooling="gem"`` by
    :class:`GeMPool` (a learned power mean). ``squeeze_excite=True``
    rescales every block's residual branch per channel by a gate computed from its
    global average (squeeze-and-excitation, Hu et al. 2018; a quarter of the channels
    in the bottleneck, at least 4). ``zero_init_residual=True`` starts every block's
    last batch-norm scale at zero: each block starts as its shortcut, and the network
    as a shallow one that grows its depth (Goyal et al. 2017). ``avg_down=True``
    averages each 2x2 window before a downsampling shortcut's 1x1 convolution, which
    then has stride 1, so the shortcut sees every pixel (ResNet-D, He et al. 2019).
    """
    def channels(n: int) -> int:
        return max(8, round(n * width))

    inputs = keras.Input(input_shape)
    male = keras.Input((1,), name="backbone_male") if sex_film else None
    x = _conv_bn(inputs, channels(64), 7, stem_stride, "stem")
    if stem_pool:
        x = MaxPool(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, filters in enumerate(map(channels, (64, 128, 256, 512)), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"stage{stage}_block{block}"
            shortcut = x
            if stride != 1 and avg_down:
                shortcut = layers.AveragePooling2D(stride, padding="same",
                                                   name=f"{name}_down_pool")(x)
                shortcut = _conv_bn(shortcut, filters, 1, 1, f"{name}_down", relu=False)
            elif stride != 1 or x.shape[-1] != filters:
                shortcut = _conv_bn(x, filters, 1, stride, f"{name}_down", relu=False)
            y = _conv_bn(x, filters, 3, stride, f"{name}_a")
            y = _conv_bn(y, filters, 3, 1, f"{name}_b", relu=False,
                         zero_gamma=zero_init_residual)
            if squeeze_excite:
                y = _squeeze_excite(y, filters, name)
            x = layers.Activation("relu", name=f"{name}_out")(layers.Add()([shortcut, y]))
        if male is not None:
            x = SexFiLM(name=f"stage{stage}_film")([x, male])
    if pooling == "attention":
        x = AttentionPool(4, name="attention_pool")(x)
    elif pooling == "gem":
        x = GeMPool(name="gem_pool")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs if male is None else [inputs, male], x, name="resnet18")


def build_backbone(name: str, image_size: int, weights: str | None,
                   width: float = 1.0, stem_pool: bool = True,
                   stem_stride: int = 2, sex_film: bool = False,
                   pooling: str = "avg", squeeze_excite: bool = False,
                   zero_init_residual: bool = False, avg_down: bool = False
                   ) -> keras.Model:
    """A headless, pooled backbone with ImageNet, no, or file weights;
    ``width`` (ResNet18 only) scales its channels, ``stem_pool=False`` (ResNet18 only)
    drops its stem's max-pool, ``stem_stride`` (ResNet18 only) is its stem
    convolution's stride, ``sex_film`` (ResNet18 only) makes it take ``[image, male]``
    and modulate every stage by sex, ``pooling`` (ResNet18 only; the others average)
    is ``avg``, ``attention`` or ``gem``, ``squeeze_excite`` (ResNet18 only) gates every
    block's channels, ``zero_init_residual`` (ResNet18 only) starts every block as its
    shortcut, ``avg_down`` (ResNet18 only) averages before each downsampling shortcut."""
    if name not in BACKBONE_SPECS:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; choose one of "
                         + ", ".join(BACKBONE_SPECS) + ".")
    constructor, _ = BACKBONE_SPECS[name]
    shape = (image_size, image_size, 3)
    if constructor is None:
        if weights == "imagenet":
            raise WeightsError(f"no ImageNet weights exist for {name} in Keras. Set "
                               "model.weights=none or a path to a weights file you saved.")
        backbone = resnet18(shape, width, stem_pool, stem_stride, sex_film, pooling,
                            squeeze_excite, zero_init_residual, avg_down)
        if weights is not None:
            _load_weights_file(backbone, weights)
        return backbone
    builder = getattr(keras.applications, constructor)
    if weights not in (None, "imagenet"):
        backbone = builder(include_top=False, weights=None, input_shape=shape, pooling="avg")
        _load_weights_file(backbone, weights)
        return with_fused_layers(backbone)
    try:
        return with_fused_layers(builder(include_top=False, weights=weights,
                                             input_shape=shape, pooling="avg"))
    except Exception as err:
        if weights != "imagenet":
            raise
        raise WeightsError(
            f"could not load ImageNet weights for {name} ({type(err).__name__}: {err}). "
            "Downloading them needs internet access; offline, set model.weights=none to "
            "train from scratch, or model.weights=PATH to a weights file (e.g. the Keras "
            f"'{constructor.lower()}_..._notop.h5' file copied from a connected machine, "
            "or ~/.keras/models/ filled there)."
        ) from None


def _load_weights_file(backbone: keras.Model, path: str) -> None:
    from pathlib import Path

    if not Path(path).expanduser().is_file():
        raise WeightsError(f"model.weights: file not found: {path}. Use imagenet, none, or "
                           "the path to a weights file (.weights.h5 or .h5).")
    try:
        backbone.load_weights(str(Path(path).expanduser()))
    except Exception as err:  # noqa: BLE001 (h5/keras loaders raise many types)
        raise WeightsError(f"model.weights: {path} does not fit the {backbone.name} "
                           f"backbone ({type(err).__name__}: {err}).") from None


def build_model(cfg: Config, label_mean: float = 127.0, label_std: float = 41.0) -> keras.Model:
    """Build (not compile) the regressor described by ``cfg``.

    ``label_mean``/``label_std`` are the training split's bone-age statistics.
    """
    m, d = cfg.model, cfg.data
    size = d.image_size
    _, mode = BACKBONE_SPECS.get(m.backbone, (None, "caffe"))
    image = keras.Input((size, size, 1), name=IMAGE)
    x = GrayPreprocess(mode, size, d.resize, d.crop_hand, cfg.augment.random_crop,
                       m.standardize, name="preprocess")(image)
    backbone = build_backbone(m.backbone, size, m.weights, m.width, m.stem_pool,
                              m.stem_stride, m.sex_film, m.pooling, m.squeeze_excite,
                              m.zero_init_residual, m.avg_down)
    inputs: Any = image
    male = keras.Input((1,), name=SEX) if m.use_sex else None
    x = backbone([x, male]) if m.sex_film else backbone(x)
    if male is not None:
        sex = layers.Dense(16, activation="relu", name="sex_dense")(male)
        x = layers.Concatenate(name="features")([x, ops.cast(sex, x.dtype)])
        inputs = model_inputs(image, male, use_sex=True)
    if m.head_units:
        x = layers.Dense(m.head_units, activation=m.head_activation, name="head_dense")(x)
        if m.dropout:
            x = layers.Dropout(m.dropout, name="head_dropout")(x)
    if m.age_distribution:
        # zero-initialised: an untrained model predicts every bin alike (the range's
        # middle)
        low, high = distribution_bins(cfg)
        x = layers.Dense(high - low + 1, kernel_initializer="zeros", dtype="float32",
                         name="head_out")(x)
        x = layers.Softmax(dtype="float32", name="age_distribution")(x)
        months = AgeExpectation(low, high, dtype="float32", name="boneage")(x)
    elif m.ordinal:
        # zero-initialised score: an untrained model's thresholds are the biases' start
        low, high = distribution_bins(cfg)
        x = layers.Dense(1, use_bias=False, kernel_initializer="zeros", dtype="float32",
                         name="head_score")(x)
        x = OrdinalThresholds(low, high, label_mean, label_std, dtype="float32",
                              name="head_out")(x)
        months = OrdinalAge(low, high, dtype="float32", name="boneage")(x)
    else:
        # zero-initialised: an untrained model predicts the training mean
        x = layers.Dense(1, kernel_initializer="zeros", dtype="float32", name="head_out")(x)
        months = LabelScale(label_mean, label_std, dtype="float32", name="boneage")(x)
    return keras.Model(inputs, months, name=f"boneage_{m.backbone}")


def refresh_batchnorm(model: keras.Model, batches: Iterable[Any]) -> int:
    """Recompute the backbone's batch-normalization moving statistics from ``batches``
    of model inputs (images as the ``image`` input takes them, or the inputs dict; a
    backbone that takes the sex needs the dict) with the weights as they are
    now: the exact mean of the batches' statistics replaces the moving averages, which
    lag behind weights that change fast (early epochs at a high rate), where the
    inference-mode predictions can then be far off the training-mode ones. Nothing else
    changes: the images pass the preprocessing in inference mode (no random crop) and
    only the backbone (no dropout) in training mode. Returns the batches used."""
    backbone = next((layer for layer in model.layers if isinstance(layer, keras.Model)),
                    None)
    if backbone is None:
        return 0
    norms = [layer for layer in backend.sublayers(backbone)
             if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return 0
    preprocess = model.get_layer("preprocess")
    momenta = [layer.momentum for layer in norms]
    used = 0
    try:
        with backend.no_grad():
            for used, batch in enumerate(batches, start=1):
                for layer in norms:   # moving = the mean of the batches so far
                    layer.momentum = (used - 1) / used
                images = batch[IMAGE] if isinstance(batch, dict) else batch
                x = preprocess(images, training=False)
                if len(backbone.inputs) > 1:
                    x = [x, ops.convert_to_tensor(batch[SEX])]
                backbone(x, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return used


def preprocessing_of(model: keras.Model) -> dict[str, Any]:
    """How a saved bone-age model expects its images: ``image_size``, ``resize``,
    ``crop_hand``, ``random_crop``, ``geometry`` (resize and hand crop as the readers
    take them) and ``use_sex``.

    Raises ValueError if ``model`` was not built by :func:`build_model`.
    """
    try:
        layer = model.get_layer("preprocess")
    except ValueError:
        layer = None
    if not isinstance(layer, GrayPreprocess):
        raise ValueError(  # noqa: TRY004 (a wrong model, not a wrong Python type)
            f"model '{model.name}' is not a boneage-keras model (it has no "
                         "'preprocess' layer); use a .keras file written by `boneage train`.")
    return {"image_size": layer.image_size, "resize": layer.resize,
            "crop_hand": layer.crop_hand, "random_crop": layer.random_crop,
            "geometry": geometry_name(layer.resize, layer.crop_hand),
            "use_sex": any(t.name == SEX for t in model.inputs)}


def load_model(path: str) -> keras.Model:
    """Load a ``.keras`` file written by this package (custom layers and metric known)."""
    from . import metrics  # noqa: F401  registers ToleranceAccuracy

    return keras.saving.load_model(path)
