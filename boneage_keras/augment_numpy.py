"""The ``numpy`` augmentation engine: every stage of ``augment.STAGES`` in NumPy, with
the geometric stages fused into one warp per image.

The ``keras`` engine runs one Keras layer per stage, eagerly, on the active backend,
several times slower (experiments/2026-11-27-augmentation-engines.md). Here random
crop, flip, rotation, translation, zoom and shear become one affine map per image (composed as the layers
would apply them one after another) and one bilinear resampling; brightness,
contrast, blur and salt-and-pepper follow as array arithmetic over the batch. No
framework, no TensorFlow: the same on torch, JAX and TensorFlow.

The ranges are those of the other engines (tests/test_augment.py measures all three
on real images). Two choices differ from Keras' layers: shear is about the image
centre (Keras shears about the top-left corner, which also shifts the image), and the
blur's sigma is drawn per image (Keras draws one per batch; keras-cv per image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _affine(stages: dict[str, dict], n: int, size: int, rng: np.random.Generator
            ) -> np.ndarray:
    """(n, 3, 3) maps from output to input pixel coordinates, both centred, as the
    flip, rotation, translation, zoom and shear layers compose in table order: warping
    by A and then by B reads the input at A @ B (tests/test_augment.py)."""
    m = np.tile(np.eye(3), (n, 1, 1))
    if "RandomFlip" in stages:
        step = np.tile(np.eye(3), (n, 1, 1))
        step[:, 0, 0] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        m = m @ step
    if "RandomRotation" in stages:
        limit = stages["RandomRotation"]["factor"] * 2 * np.pi
        angle = rng.uniform(-limit, limit, n)
        cos, sin = np.cos(angle), np.sin(angle)
        step = np.tile(np.eye(3), (n, 1, 1))
        step[:, 0, 0], step[:, 0, 1], step[:, 1, 0], step[:, 1, 1] = cos, -sin, sin, cos
        m = m @ step
    if "RandomTranslation" in stages:
        a = stages["RandomTranslation"]
        step = np.tile(np.eye(3), (n, 1, 1))
        step[:, 0, 2] = rng.uniform(-1, 1, n) * a["width_factor"] * size
        step[:, 1, 2] = rng.uniform(-1, 1, n) * a["height_factor"] * size
        m = m @ step
    if "RandomZoom" in stages:
        low, high = stages["RandomZoom"]["height_factor"]
        z = 1.0 + rng.uniform(low, high, n)      # the image shows at scale 1 / z
        step = np.tile(np.eye(3), (n, 1, 1))
        step[:, 0, 0], step[:, 1, 1] = z, z
        m = m @ step
    if "RandomShear" in stages:
        a = stages["RandomShear"]
        step = np.tile(np.eye(3), (n, 1, 1))
        step[:, 0, 1] = rng.uniform(-a["x_factor"], a["x_factor"], n)
        step[:, 1, 0] = rng.uniform(-a["y_factor"], a["y_factor"], n)
        m = m @ step
    return m


def warp(images: np.ndarray, maps: np.ndarray, size: int,
         offsets: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resampling of ``images`` (n, side, side) at ``maps`` (n, 3, 3, from
    centred output pixels of a size x size image to centred input pixels), the input
    window starting at ``offsets`` (n, 2: row, column; random crop) or centred; pixels
    from outside the input are black."""
    n, side = images.shape[0], images.shape[1]
    centre = (size - 1) / 2.0
    grid = np.arange(size, dtype=np.float64) - centre
    xs, ys = np.meshgrid(grid, grid)                               # (size, size)
    x = maps[:, 0, 0, None, None] * xs + maps[:, 0, 1, None, None] * ys \
        + maps[:, 0, 2, None, None] + centre
    y = maps[:, 1, 0, None, None] * xs + maps[:, 1, 1, None, None] * ys \
        + maps[:, 1, 2, None, None] + centre
    if offsets is None:
        offsets = np.full((n, 2), (side - size) / 2.0)
    y += offsets[:, 0, None, None]
    x += offsets[:, 1, None, None]
    # one black pixel around every image: neighbours outside the input read 0
    padded = np.zeros((n, side + 2, side + 2), np.float32)
    padded[:, 1:-1, 1:-1] = images
    inside = (x > -1) & (x < side) & (y > -1) & (y < side)
    x = np.clip(x + 1, 0, side + 1 - 1e-6)
    y = np.clip(y + 1, 0, side + 1 - 1e-6)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    x1, y1 = np.minimum(x0 + 1, side + 1), np.minimum(y0 + 1, side + 1)
    stride = side + 2
    base = (np.arange(n) * stride * stride)[:, None, None]
    flat = padded.reshape(-1)

    def at(yy, xx):
        return flat[base + yy * stride + xx]

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return np.where(inside, top * (1 - fy) + bottom * fy, 0.0).astype(np.float32)


def _blur(images: np.ndarray, sigma: np.ndarray, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur, one sigma per image, zero padding (as a 'same'
    convolution)."""
    half = kernel_size // 2
    taps = np.arange(-half, half + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps[None] / sigma[:, None].astype(np.float32)) ** 2)
    kernel /= kernel.sum(axis=1, keepdims=True)                    # (n, k)
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (half, half)
        p = np.pad(out, pad)
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for k in range(kernel_size):
            window = p[:, k:k + length] if axis == 1 else p[:, :, k:k + length]
            acc += kernel[:, k, None, None] * window
        out = acc
    return out


def build_numpy_stack(stages: list[tuple[Any, dict]], value_range: tuple[float, float]
                      ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A function (batch (n, side, side, 1) float32, generator) -> augmented batch
    (n, size, size, 1) over ``(stage, arguments)`` in table order, clipped to the range.
    ``side`` is larger than ``size`` only with random crop."""
    by_layer = {stage.layer: arguments for stage, arguments in stages}
    low, high = value_range
    geometric = {"RandomCrop", "RandomFlip", "RandomRotation", "RandomTranslation",
                 "RandomZoom", "RandomShear"} & set(by_layer)

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        images = np.asarray(batch, np.float32)[..., 0]
        n, side = images.shape[0], images.shape[1]
        if geometric:
            size = by_layer["RandomCrop"]["height"] if "RandomCrop" in by_layer else side
            offsets = None
            if "RandomCrop" in by_layer:
                offsets = rng.integers(0, side - size + 1, (n, 2)).astype(np.float64)
            images = warp(images, _affine(by_layer, n, size, rng), size, offsets)
        if "RandomBrightness" in by_layer:
            factor = by_layer["RandomBrightness"]["factor"]
            delta = rng.uniform(-factor, factor, n).astype(np.float32) * (high - low)
            images = np.clip(images + delta[:, None, None], low, high)
        if "RandomContrast" in by_layer:
            lower, upper = by_layer["RandomContrast"]["factor"]
            factor = rng.uniform(1 - lower, 1 + upper, n).astype(np.float32)[:, None, None]
            mean = images.mean(axis=(1, 2), keepdims=True)
            images = np.clip((images - mean) * factor + mean, low, high)
        if "RandomGaussianBlur" in by_layer:
            a = by_layer["RandomGaussianBlur"]
            chosen = rng.random(n) < a["probability"]
            sigma = rng.uniform(*a["sigma"], n)
            if chosen.any():
                images = images.copy()
                images[chosen] = _blur(images[chosen], sigma[chosen], a["kernel_size"])
        if "SaltAndPepper" in by_layer:
            f_low, f_high = by_layer["SaltAndPepper"]["fraction"]
            fractions = rng.uniform(f_low, f_high, n).astype(np.float32)[:, None, None]
            noise = rng.random(images.shape, dtype=np.float32)
            images = np.where(noise < fractions / 2, high, images)
            images = np.where(noise > 1 - fractions / 2, low, images)
        return np.clip(images, low, high).astype(np.float32)[..., None]

    return augment
