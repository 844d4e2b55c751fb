"""From images to months: model files, test-time augmentation, MC dropout, ensembles.

    >>> members = open_members(["runs/a", "runs/b/best.keras", "deploy/model.onnx"])
    >>> out = predict_images(members, paths, male, tta=4, mc_samples=20)
    >>> out.predicted, out.std, out.lower, out.upper     # months; 90% interval
    >>> out.members, out.no_tta                           # per model; identity view only

* Test-time augmentation averages the model over ``tta`` deterministic views of each
  image, in this order: identity, horizontal flip, rotation +5/-5 degrees, shifts of 4%
  right/left/down/up (``TTA_VIEWS``; fill black, as the training augmentation does).
* MC dropout (``mc_samples`` > 1) runs a copy of a ``.keras`` model with its Dropout
  layers left on (batch norm stays in inference mode) ``mc_samples`` times per image.
* Ensembles average the members' predictions; the spread between members adds to the
  uncertainty (law of total variance: mean MC variance + variance of member means).
* The point prediction is always the deterministic one (dropout off), so MAE with and
  without uncertainty is the same number; the 90% interval is ``predicted +- 1.645 std``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .data import DataError
from .errors import BoneAgeError
from .images import load_image
from .model import load_model, preprocessing_of

Z90 = 1.6448536269514722   # two-sided 90% normal quantile
TTA_VIEWS = ("identity", "flip", "rotate+5", "rotate-5", "shift-right", "shift-left",
             "shift-down", "shift-up")
SHIFT = 0.04


class ModelFileError(BoneAgeError, ValueError):
    """A model file is missing or is not a bone-age model."""


class KerasPredictor:
    """A ``.keras`` bone-age model: ``predict_batch(images, male) -> months``."""

    def __init__(self, model: keras.Model, name: str = "model") -> None:
        self.model = model
        self.name = name
        self.preprocessing = preprocessing_of(model)
        self._mc_model: keras.Model | None = None

    def _inputs(self, images: np.ndarray, male: np.ndarray | None) -> Any:
        if self.preprocessing["use_sex"]:
            return {"image": images, "male": male}
        return images

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        out = self.model.predict_on_batch(self._inputs(images, male))
        return np.asarray(keras.ops.convert_to_numpy(out)).reshape(-1)

    def sample_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        """One MC-dropout sample: the model with its Dropout layers active."""
        if self._mc_model is None:
            self._mc_model = dropout_on_copy(self.model, self.name)
        out = self._mc_model.predict_on_batch(self._inputs(images, male))
        return np.asarray(keras.ops.convert_to_numpy(out)).reshape(-1)


class SamplingDropout(keras.layers.Dropout):
    """Dropout that also drops at inference: the MC-dropout copy's Dropout layers."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=True)


def dropout_on_copy(model: keras.Model, name: str = "model") -> keras.Model:
    """A copy of ``model`` (same weights) whose Dropout layers drop at inference too.

    Built with ``keras.models.clone_model(clone_function=...)``: each Dropout becomes a
    :class:`SamplingDropout` with the same rate; every other layer, batch
    normalisation included, is cloned as it is and keeps inference behaviour."""
    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.Dropout) and layer.rate > 0:
            return SamplingDropout.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    if not any(isinstance(layer, keras.layers.Dropout) and layer.rate > 0
               for layer in model.layers):
        raise ModelFileError(f"{name} has no Dropout layer in its head, so MC dropout "
                             "cannot sample it; use --mc-samples 0, or an ensemble "
                             "(several --model) for uncertainty.")
    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


class SavedModelPredictor:
    """An exported SavedModel, through its ``preprocessed`` signature."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        import tensorflow as tf

        self.tf = tf
        self.name = str(path)
        self.signature = tf.saved_model.load(str(path)).signatures["preprocessed"]
        self.preprocessing = _preprocessing_from_meta(meta)

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        kwargs = {"image": self.tf.constant(images)}
        if self.preprocessing["use_sex"]:
            kwargs["male"] = self.tf.constant(male)
        return self.signature(**kwargs)["boneage"].numpy().reshape(-1)


class OnnxPredictor:
    """An exported ONNX model in onnxruntime."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelFileError("onnxruntime is not installed: pip install onnxruntime "
                                 f"to run {path}.") from None
        self.name = str(path)
        self.session = onnxruntime.InferenceSession(str(path))
        self.names = [i.name for i in self.session.get_inputs()]
        self.preprocessing = _preprocessing_from_meta(meta)

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        feeds = {self.names[0]: images}
        if self.preprocessing["use_sex"]:
            feeds[self.names[1]] = male
        return self.session.run(None, feeds)[0].reshape(-1)


def _preprocessing_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    pre = meta["preprocessing"]
    return {"image_size": meta["input_size"], "resize": pre["resize"],
            "crop": pre["center_crop"], "use_sex": meta["use_sex"]}


def _export_meta(path: Path) -> dict[str, Any]:
    for candidate in (path.parent / "model.json", path / "model.json",
                      path.parent.parent / "model.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ModelFileError(f"{path}: no model.json found beside it; SavedModel and ONNX files "
                         "are read with the model.json that `cli.py export` writes.")


def open_model(path: str | Path) -> keras.Model:
    """Load a bone-age ``.keras`` model, with a clear error for anything else."""
    path = Path(path)
    if path.is_dir() and (path / "best.keras").is_file():
        path = path / "best.keras"
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}. Pass a .keras file written by "
                             "`cli.py train` (e.g. runs/NAME/best.keras) or a run directory.")
    try:
        model = load_model(str(path))
    except Exception as err:  # noqa: BLE001 (any failure means: not a usable model)
        raise ModelFileError(f"{path} cannot be loaded as a Keras model "
                             f"({type(err).__name__}: {err}).") from None
    try:
        preprocessing_of(model)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None
    return model


def open_predictor(path: str | Path) -> Any:
    """A predictor for a ``.keras`` file, run directory, SavedModel folder or ``.onnx``."""
    path = Path(path)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return SavedModelPredictor(path, _export_meta(path))
    if path.suffix == ".onnx" and path.is_file():
        return OnnxPredictor(path, _export_meta(path))
    return KerasPredictor(open_model(path), str(path))


def open_members(paths: Sequence[str | Path]) -> list[Any]:
    """Predictors for one model or an ensemble (each path as for :func:`open_predictor`)."""
    if not paths:
        raise ModelFileError("no model given: pass --model FILE (repeat it for an ensemble).")
    return [open_predictor(p) for p in paths]


def as_members(model: Any) -> list[Any]:
    """A Keras model, a predictor, or a list of them -> a list of predictors."""
    items = model if isinstance(model, (list, tuple)) else [model]
    return [KerasPredictor(m, m.name) if isinstance(m, keras.Model) else m for m in items]


def tta_views(images: np.ndarray, n: int) -> list[np.ndarray]:
    """The first ``n`` deterministic views of a batch (B, H, W, 1) of 0-255 images."""
    from scipy import ndimage

    if not 1 <= n <= len(TTA_VIEWS):
        raise DataError(f"--tta {n}: choose 1 (off) to {len(TTA_VIEWS)} views "
                        f"({', '.join(TTA_VIEWS)}).")
    size = images.shape[1]
    step = round(SHIFT * size)
    views = []
    for name in TTA_VIEWS[:n]:
        if name == "identity":
            views.append(images)
        elif name == "flip":
            views.append(images[:, :, ::-1, :])
        elif name.startswith("rotate"):
            angle = float(name[len("rotate"):])
            views.append(ndimage.rotate(images, angle, axes=(2, 1), reshape=False, order=1,
                                        mode="constant", cval=0.0))
        else:
            dy, dx = {"shift-right": (0, step), "shift-left": (0, -step),
                      "shift-down": (step, 0), "shift-up": (-step, 0)}[name]
            views.append(ndimage.shift(images, (0, dy, dx, 0), order=0, mode="constant",
                                       cval=0.0))
    return [np.ascontiguousarray(v, dtype=np.float32) for v in views]


@dataclass
class Prediction:
    """Months per image. ``members`` (M, N) per model; ``no_tta`` the identity view's
    ensemble mean; ``std``/``lower``/``upper`` only with MC samples or several models."""

    predicted: np.ndarray
    members: np.ndarray
    no_tta: np.ndarray
    names: list[str]
    views: int = 1
    std: np.ndarray | None = None

    @property
    def lower(self) -> np.ndarray | None:
        return None if self.std is None else self.predicted - Z90 * self.std

    @property
    def upper(self) -> np.ndarray | None:
        return None if self.std is None else self.predicted + Z90 * self.std


def _check_sex(members: list[Any], male: np.ndarray | None) -> None:
    if male is None and any(m.preprocessing["use_sex"] for m in members):
        raise DataError("this model takes the patient's sex as a second input; give it "
                        "(a male/Sex column, or --sex M|F for single images).")


def predict_images(model: Any, paths: Sequence[str], male: np.ndarray | None = None,
                   tta: int = 1, mc_samples: int = 0, batch_size: int = 32,
                   progress: bool = True,
                   reader: Callable[..., np.ndarray] | Sequence[Callable] = load_image,
                   ) -> Prediction:
    """Predict every image with each member (TTA views averaged, MC samples drawn).

    ``reader`` decodes ``(path, size, resize, crop)``: ``load_image`` or a prepared
    cache's ``load``; one per member, or one for all."""
    members = as_members(model)
    _check_sex(members, male)
    if mc_samples > 1:
        for m in members:
            if not isinstance(m, KerasPredictor):
                raise ModelFileError(f"{m.name}: MC dropout needs a .keras model (exported "
                                     "SavedModel/ONNX graphs run with dropout off).")
    readers = list(reader) if isinstance(reader, (list, tuple)) else [reader] * len(members)
    total = len(paths) * len(members)
    bar = keras.utils.Progbar(total, unit_name="image") if progress else None
    point, identity, variance = [], [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for member, read in zip(members, readers):
            pre = member.preprocessing
            size, resize, crop = pre["image_size"], pre["resize"], pre["crop"]
            outs: dict[str, list[np.ndarray]] = {"point": [], "identity": [], "var": []}
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                n = len(chunk)
                images = np.stack(list(pool.map(read, chunk, [size] * n, [resize] * n,
                                                [crop] * n))).astype(np.float32)
                sex = None
                if pre["use_sex"]:
                    sex = np.asarray(male[start:start + batch_size],
                                     np.float32).reshape(-1, 1)
                views = [member.predict_batch(v, sex) for v in tta_views(images, tta)]
                outs["point"].append(np.mean(views, axis=0))
                outs["identity"].append(views[0])
                if mc_samples > 1:
                    samples = [member.sample_batch(images, sex) for _ in range(mc_samples)]
                    outs["var"].append(np.var(samples, axis=0, ddof=1))
                if bar is not None:
                    bar.add(len(chunk))
            empty = np.zeros(0, np.float32)
            point.append(np.concatenate(outs["point"]) if outs["point"] else empty)
            identity.append(np.concatenate(outs["identity"]) if outs["identity"] else empty)
            if outs["var"]:
                variance.append(np.concatenate(outs["var"]))
    members_pred = np.stack(point).astype(np.float64)
    std = None
    if variance or len(members) > 1:
        total_var = np.zeros(members_pred.shape[1])
        if variance:
            total_var += np.mean(variance, axis=0)
        if len(members) > 1:
            total_var += np.var(members_pred, axis=0, ddof=1)
        std = np.sqrt(total_var)
    return Prediction(members_pred.mean(axis=0), members_pred,
                      np.stack(identity).astype(np.float64).mean(axis=0),
                      [m.name for m in members], tta, std)
