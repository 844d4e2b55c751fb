"""An exported model without Keras: ``model.onnx`` in onnxruntime with the
``model.json`` that describes it, test-time augmentation views and the stored
calibration. Imports neither Keras nor pandas, so the model server (``serve.py``) and
any machine with onnxruntime alone can use it.

    >>> model = OnnxPredictor(Path("deploy/model.onnx"), export_meta(Path("deploy/model.onnx")))
    >>> months = model.predict_batch(images, male)       # (N, S, S, 1) float32 0-255
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BoneAgeError, DataError
from .extras import install_hint
from .images import geometry_name

TTA_VIEWS = ("identity", "flip", "rotate+5", "rotate-5", "shift-right", "shift-left",
             "shift-down", "shift-up")
SHIFT = 0.04


class ModelFileError(BoneAgeError, ValueError):
    """A model file is missing or is not a bone-age model."""


class OnnxPredictor:
    """An exported ONNX model in onnxruntime."""

    def __init__(self, path: Path, meta: dict[str, Any],
                 threads: int | None = None) -> None:
        """``threads``: onnxruntime's intra-op threads (default: its own choice, one per
        core, whose idle threads spin)."""
        try:
            import onnxruntime
        except ImportError:
            raise ModelFileError(f"running {path} needs onnxruntime, which is not installed "
                                 f"here: {install_hint('onnxruntime')}.") from None
        self.name = str(path)
        try:
            options = onnxruntime.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
            self.runtime = onnxruntime.InferenceSession(str(path), options)
        except Exception as err:  # noqa: BLE001 (onnxruntime raises its own types)
            raise ModelFileError(f"{path} is not a readable ONNX model "
                                 f"({str(err).splitlines()[0][:200]}); export it again "
                                 "with `boneage export`.") from None
        inputs = self.runtime.get_inputs()
        self.names = [i.name for i in inputs]
        self.preprocessing = preprocessing_from_meta(meta)
        size = self.preprocessing["image_size"]
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[1:3] != [size, size]:
            raise ModelFileError(f"{path} takes images of shape {shape}, but its model.json "
                                 f"says image_size {size}: the two come from different "
                                 "exports; keep each model.onnx with its own model.json.")
        if len(inputs) != (2 if self.preprocessing["use_sex"] else 1):
            raise ModelFileError(f"{path} has {len(inputs)} input(s), but its model.json "
                                 f"says use_sex={self.preprocessing['use_sex']}: they come "
                                 "from different exports.")

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        feeds = {self.names[0]: images}
        if self.preprocessing["use_sex"]:
            feeds[self.names[1]] = male
        return self.runtime.run(None, feeds)[0].reshape(-1)


def preprocessing_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``preprocessing_of``'s dict from an export's model.json (also as written before
    it used the config's names: ``input_size``, ``center_crop``, ``hand+`` resize)."""
    pre = meta["preprocessing"]
    resize = pre["resize"]
    crop_hand = bool(pre.get("crop_hand", resize.startswith("hand+")))
    resize = resize.removeprefix("hand+")
    return {"image_size": meta.get("image_size", meta.get("input_size")), "resize": resize,
            "crop_hand": crop_hand,
            "random_crop": bool(pre.get("random_crop", pre.get("center_crop", False))),
            "geometry": geometry_name(resize, crop_hand), "use_sex": meta["use_sex"]}


def export_meta(path: Path) -> dict[str, Any]:
    """The model.json of an export, found beside a model.onnx, in a SavedModel's folder
    or above its numbered version folder."""
    for candidate in (path.parent / "model.json", path / "model.json",
                      path.parent.parent / "model.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError as err:
                raise ModelFileError(f"{candidate} is not valid JSON ({err}); export the "
                                     "model again.") from None
    raise ModelFileError(f"{path}: no model.json found beside it; SavedModel and ONNX files "
                         "are read with the model.json that `boneage export` writes.")


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


def find_calibration(model_path: str | Path, members: int, mc_samples: int, tta: int
                     ) -> dict[str, Any]:
    """The calibration stored with a model: ``calibration.json`` in its run directory
    (or beside its .keras file), or the ``calibration`` of an export's model.json; it
    must have been fitted for the same number of models, TTA views and MC sampling."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    cal = None
    if (folder / "calibration.json").is_file():
        cal = json.loads((folder / "calibration.json").read_text())
    elif (folder / "model.json").is_file() or path.suffix == ".onnx":
        cal = export_meta(path).get("calibration")
    if cal is None:
        raise ModelFileError(f"--recalibrate: no calibration stored with {model_path}; fit "
                             "one with `boneage evaluate RUN --recalibrate` (it needs a run "
                             "with a test split), then export or predict from that run.")
    if (cal.get("members", 1) != members or cal.get("tta", 1) != tta
            or (cal.get("mc_samples", 0) > 1) != (mc_samples > 1)):
        raise ModelFileError(f"--recalibrate: the calibration of {model_path} was fitted for "
                             f"{cal.get('members', 1)} model(s), --tta {cal.get('tta', 1)} "
                             f"and --mc-samples {cal.get('mc_samples', 0)}; predict the "
                             "same way.")
    return cal
