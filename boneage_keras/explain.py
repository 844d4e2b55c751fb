"""Grad-CAM: which part of the radiograph drives the predicted age.

    >>> heat, months = grad_cam(model, images, male)      # heat (B, H, W) in 0..1
    >>> explain_images("runs/a", ["scan.png"], "cams/")   # overlays + heatmaps.npz

The map is Grad-CAM (Selvaraju et al. 2017) of the backbone's last convolutional block:
the block's channels weighted by the average gradient of the predicted months and
summed, scaled to 0..1 per image and resized to the input. Bone age is a regression:
a region that pulls the estimate down (open growth plates) matters as much as one that
pushes it up, so by default the map keeps both signs (``mode="abs"``: the magnitude of
the weighted sum); ``mode="positive"`` is the classification recipe (ReLU: only regions
that raise the age; experiments/2026-11-22-gradcam-sign.md). Keras 3 has no
backend-neutral gradient call; ``backend.value_and_gradient`` is the one place that
knows the backends.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from keras import ops

from .backend import value_and_gradient
from .data import DataError
from .files import check_output_dir, replacing, write_csv
from .images import load_image
from .inference import (
    KerasPredictor,
    ModelFileError,
    collect_inputs,
    open_predictor,
    sex_column,
)
from .model import preprocessing_of


class _CamParts:
    """The model split at the backbone's last 4-D output: image (+ sex, for a backbone
    that takes it: ``model.sex_film``) -> feature map, and feature map (+ sex) ->
    months, reusing the trained layers."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.use_sex = preprocessing_of(model)["use_sex"]
        self.preprocess = model.get_layer("preprocess")
        backbones = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        if len(backbones) != 1:
            raise ModelFileError(f"{model.name}: expected one nested backbone model for "
                                 "Grad-CAM, found " + str(len(backbones)) + ".")
        backbone = backbones[0]
        conv = next((layer for layer in reversed(backbone.layers[:-1])
                     if len(layer.output.shape) == 4), None)
        if conv is None or len(backbone.layers[-1].output.shape) != 2:
            raise ModelFileError(f"{backbone.name}: no conv feature map followed by global "
                                 "pooling; Grad-CAM needs a pooled convolutional backbone.")
        self.conv_name = conv.name
        self.features = keras.Model(backbone.inputs, conv.output)
        self.pool = backbone.layers[-1]
        self.head = [model.get_layer(name) for name in
                     ("head_dense", "head_dropout", "head_score", "head_out", "age_distribution",
                      "boneage")
                     if any(layer.name == name for layer in model.layers)]

    def months(self, feature_map: Any, male: Any) -> Any:
        x = self.pool(feature_map)
        if self.use_sex:
            sex = self.model.get_layer("sex_dense")(male)
            x = self.model.get_layer("features")([x, ops.cast(sex, x.dtype)])
        for layer in self.head:
            x = layer(x)
        return x


def grad_cam(model: keras.Model, images: np.ndarray, male: np.ndarray | None = None,
             mode: str = "abs") -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (B, H, W) in 0..1 and the predicted months (B,) for a batch of
    0-255 gray images (B, H, W, 1) at the model's input size (``mode``: abs or
    positive, see the module docstring)."""
    if mode not in ("abs", "positive"):
        raise ValueError(f"grad_cam mode {mode!r}: use 'abs' or 'positive'.")
    parts = _CamParts(model)
    if parts.use_sex and male is None:
        raise DataError("this model takes the patient's sex; give it (--sex M|F or a CSV "
                        "with a Sex column) to explain its predictions.")
    images = np.asarray(images, np.float32)
    sex = None if male is None else ops.convert_to_tensor(
        np.asarray(male, np.float32).reshape(-1, 1))
    x = parts.preprocess(ops.convert_to_tensor(images))
    feature_map = parts.features([x, sex] if len(parts.features.inputs) > 1 else x)
    months, grads = value_and_gradient(lambda f: parts.months(f, sex), feature_map)
    fmap = ops.convert_to_numpy(ops.cast(feature_map, "float32"))
    grads = ops.convert_to_numpy(ops.cast(grads, "float32"))
    weights = grads.mean(axis=(1, 2), keepdims=True)            # (B, 1, 1, C)
    cam = (weights * fmap).sum(axis=-1)                           # (B, h, w)
    cam = np.abs(cam) if mode == "abs" else np.maximum(cam, 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)
    return (resize_maps(cam, images.shape[1:3]),
            np.asarray(ops.convert_to_numpy(months), np.float64).reshape(-1))


def resize_maps(cams: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (B, h, w) maps to (B, *shape), clipped to 0..1."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(
        (shape[1], shape[0]), Image.BILINEAR)) for c in cams]).clip(0.0, 1.0)


def explain_images(model_path: str | Path, inputs: Iterable[str | Path],
                   out_dir: str | Path, sex: str | None = None,
                   batch_size: int = 16) -> pd.DataFrame:
    """Write ``<id>_gradcam.png`` overlays, ``gradcam_grid.png`` and ``heatmaps.npz``
    (id -> map) for images/folders/test CSVs; returns id, predicted, figure."""
    from .plots import plot_examples, plot_heatmap

    predictor = open_predictor(model_path)
    if not isinstance(predictor, KerasPredictor):
        raise ModelFileError(f"{model_path}: Grad-CAM needs the .keras model (or its run "
                             "directory); exported SavedModel/ONNX graphs have no "
                             "gradients to read.")
    model = predictor.model
    table = collect_inputs(inputs, sex)
    pre = predictor.preprocessing
    male = sex_column(table, pre["use_sex"])
    out_dir = check_output_dir(out_dir, "--out")
    rows, maps, shown = [], {}, []
    for start in range(0, len(table), batch_size):
        chunk = table.iloc[start:start + batch_size]
        images = np.stack([load_image(p, pre["image_size"], pre["geometry"],
                                      pre["random_crop"])
                           for p in chunk["path"]]).astype(np.float32)
        heat, months = grad_cam(model, images,
                                None if male is None else male[start:start + batch_size])
        for image_id, image, h, m in zip(chunk["id"], images, heat, months):
            figure = plot_heatmap(image, h, out_dir / f"{image_id}_gradcam.png",
                                  f"id {image_id}: predicted {m:.1f} months")
            rows.append({"id": image_id, "predicted": float(m), "figure": str(figure)})
            maps[str(image_id)] = h.astype(np.float16)
            if len(shown) < 12:
                shown.append((image, h, f"id {image_id}\npred {m:.0f}"))
    with replacing(out_dir / "heatmaps.npz") as tmp:
        np.savez_compressed(tmp, **maps)
    columns = min(6, len(shown))
    plot_examples([s[0] for s in shown], [s[2] for s in shown], columns,
                  out_dir / "gradcam_grid.png", title="Grad-CAM", row_labels=(),
                  heatmaps=[s[1] for s in shown])
    result = pd.DataFrame(rows)
    write_csv(out_dir / "explanations.csv", result)
    return result
