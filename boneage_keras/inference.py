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

import logging
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from . import console
from .calibration import apply_calibration
from .data import IMAGE_SUFFIXES, DataError
from .errors import BoneAgeError
from .exported import (  # noqa: F401  (part of this module's interface)
    SHIFT,
    TTA_VIEWS,
    ModelFileError,
    OnnxPredictor,
    export_meta,
    find_calibration,
    preprocessing_from_meta,
    tta_views,
)
from .extras import install_hint
from .files import check_output_file, write_csv
from .images import ImageError, load_image
from .inputs import IMAGE, SEX, model_inputs
from .model import load_model, preprocessing_of
from .patient import sex_or_error, sex_with_header

log = logging.getLogger(__name__)
Z90 = 1.6448536269514722   # two-sided 90% normal quantile


class KerasPredictor:
    """A ``.keras`` bone-age model: ``predict_batch(images, male) -> months``."""

    def __init__(self, model: keras.Model, name: str = "model") -> None:
        self.model = model
        self.name = name
        self.preprocessing = preprocessing_of(model)
        self._mc_model: keras.Model | None = None

    def _inputs(self, images: np.ndarray, male: np.ndarray | None) -> Any:
        return model_inputs(images, male, self.preprocessing["use_sex"])

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
        try:
            import tensorflow as tf
        except ImportError:
            raise ModelFileError(f"{path} is a TensorFlow SavedModel and TensorFlow is not "
                                 f"installed here: {install_hint('tensorflow')}, or use the "
                                 "model.keras or model.onnx of the same export.") from None
        self.tf = tf
        self.name = str(path)
        try:
            self.signature = tf.saved_model.load(str(path)).signatures["preprocessed"]
        except Exception as err:  # noqa: BLE001 (TF raises many types for broken files)
            raise ModelFileError(f"{path} cannot be loaded as a SavedModel written by "
                                 f"`boneage export` ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]}); export it again."
                                 ) from None
        self.preprocessing = preprocessing_from_meta(meta)

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        kwargs = {IMAGE: self.tf.constant(images)}
        if self.preprocessing["use_sex"]:
            kwargs[SEX] = self.tf.constant(male)
        return self.signature(**kwargs)["boneage"].numpy().reshape(-1)


def open_model(path: str | Path) -> keras.Model:
    """Load a bone-age ``.keras`` model, with a clear error for anything else."""
    path = Path(path)
    if path.is_dir() and (path / "best.keras").is_file():
        path = path / "best.keras"
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}. Pass a .keras file written by "
                             "`boneage train` (e.g. runs/NAME/best.keras) or a run directory.")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a Keras model file (a .keras file is a zip "
                             "archive; this one is not, so it is damaged or something "
                             "else renamed). Pass a .keras file written by `boneage train`.")
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
        return SavedModelPredictor(path, export_meta(path))
    if path.suffix == ".onnx" and path.is_file():
        return OnnxPredictor(path, export_meta(path))
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
    failed: dict[int, str] = field(default_factory=dict)   # index -> why unreadable

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


def _try_read(read: Callable[..., np.ndarray], path: str, image_size: int,
              geometry: str, random_crop: bool) -> tuple[np.ndarray | None, str | None]:
    try:
        return read(path, image_size, geometry, random_crop), None
    except ImageError as err:
        return None, str(err)


def predict_images(model: Any, paths: Sequence[str], male: np.ndarray | None = None,
                   tta: int = 1, mc_samples: int = 0, batch_size: int = 32,
                   progress: bool = True,
                   reader: Callable[..., np.ndarray] | Sequence[Callable] = load_image,
                   skip_unreadable: bool = False) -> Prediction:
    """Predict every image with each member (TTA views averaged, MC samples drawn).

    ``reader`` decodes ``(path, image_size, geometry, random_crop)``: ``load_image``
    or a prepared cache's ``load``; one per member, or one for all. An image that cannot be decoded
    raises, or with ``skip_unreadable`` gets NaN months and its reason in ``failed``.
    A model that predicts non-finite months for a readable image is an error."""
    members = as_members(model)
    _check_sex(members, male)
    if mc_samples > 1:
        for m in members:
            if not isinstance(m, KerasPredictor):
                raise ModelFileError(f"{m.name}: MC dropout needs a .keras model (exported "
                                     "SavedModel/ONNX graphs run with dropout off).")
    readers = list(reader) if isinstance(reader, (list, tuple)) else [reader] * len(members)
    total = len(paths) * len(members)
    bar = console.progress(total, unit_name="image") if progress else None
    point, identity, variance = [], [], []
    failed: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for member, read in zip(members, readers):
            pre = member.preprocessing
            size, geometry = pre["image_size"], pre["geometry"]
            random_crop = pre["random_crop"]
            outs: dict[str, list[np.ndarray]] = {"point": [], "identity": [], "var": []}
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                n = len(chunk)
                decoded = list(pool.map(_try_read, [read] * n, chunk, [size] * n,
                                        [geometry] * n, [random_crop] * n))
                for offset, (_, problem) in enumerate(decoded):
                    if problem is not None:
                        if not skip_unreadable:
                            raise ImageError(problem)
                        failed[start + offset] = problem
                blank = np.zeros((size, size, 1), np.uint8)
                images = np.stack([blank if image is None else image
                                   for image, _ in decoded]).astype(np.float32)
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
    no_tta = np.stack(identity).astype(np.float64)
    bad = sorted(failed)
    members_pred[:, bad] = np.nan
    no_tta[:, bad] = np.nan
    readable = np.ones(len(paths), bool)
    readable[bad] = False
    broken = ~np.isfinite(members_pred[:, readable]).all(axis=0)
    if broken.any():
        first = np.asarray(paths)[readable][broken][0]
        raise ModelFileError(f"the model predicts non-finite months for {int(broken.sum())} "
                             f"image(s) (e.g. {first}): it is broken, e.g. trained to a NaN "
                             "loss; retrain it.")
    std = None
    if variance or len(members) > 1:
        total_var = np.zeros(members_pred.shape[1])
        if variance:
            total_var += np.mean(variance, axis=0)
        if len(members) > 1:
            total_var += np.var(members_pred, axis=0, ddof=1)
        std = np.sqrt(total_var)
    return Prediction(members_pred.mean(axis=0), members_pred, no_tta.mean(axis=0),
                      [m.name for m in members], tta, std, failed)


# --- a user's inputs and the predict command ------------------------------------


def extra_columns(prediction: Prediction) -> pd.DataFrame:
    """The TTA, ensemble and uncertainty columns of predictions tables."""
    extra: dict[str, np.ndarray] = {}
    if prediction.views > 1:
        extra["predicted_no_tta"] = prediction.no_tta
    if len(prediction.members) > 1:
        for k, member in enumerate(prediction.members):
            extra[f"member_{k}"] = member
    if prediction.std is not None:
        extra.update(std=prediction.std, lower90=prediction.lower, upper90=prediction.upper)
    return pd.DataFrame(extra)


def collect_inputs(inputs: Iterable[str | Path], sex: str | None = None,
                   sex_override: bool = False, chronological_age: float | None = None,
                   id_from: str = "file") -> pd.DataFrame:
    """Image files (PNG, JPEG, DICOM), folders of them (searched recursively, as a PACS
    export nests them), or a test CSV -> table ``id, path, male, chronological_age``.

    The Kaggle test layout is ``boneage-test-dataset.csv`` (``Case ID``, ``Sex``) with
    images in ``boneage-test-dataset/`` beside it; a labels CSV with ``id`` and
    ``male`` columns and images in ``images/`` works too (an optional
    ``chronological_age`` column in months is read). For DICOM files the header's
    PatientSex is used when ``sex`` is not given (a ``sex`` that contradicts it is an
    error unless ``sex_override``), and the chronological age comes from PatientAge or
    StudyDate - PatientBirthDate; ``chronological_age`` (months) fills it for the
    others. ``id_from="sop"`` names DICOM rows by their SOPInstanceUID instead of the
    file name. Files in folders that are not images are skipped and listed in
    ``table.attrs["skipped"]`` (name, reason).
    """
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    default_male = sex_or_error(sex, "--sex") if sex is not None else None
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            rows.extend(_rows_from_csv(item))
        elif item.is_dir():
            files, passed = _folder_images(item)
            skipped.extend(passed)
            if not files:
                raise DataError(f"{item}: folder holds no PNG, JPEG or DICOM images"
                                + (f" ({len(passed)} other files skipped, e.g. "
                                   f"{passed[0][0]}: {passed[0][1]})" if passed else "")
                                + ".")
            rows.extend({"id": p.stem, "path": str(p), "male": None} for p in files)
        elif item.is_file():
            rows.append({"id": item.stem, "path": str(item), "male": None})
        else:
            raise DataError(f"input not found: {item}. Give image files, folders of images "
                            "or a test CSV.")
    if not rows:
        raise DataError("no input given: pass image files, folders or a test CSV.")
    for row in rows:
        _fill_from_header(row, default_male, sex_override, chronological_age, id_from)
    table = pd.DataFrame(rows)
    if "chronological_age" not in table:
        table["chronological_age"] = np.nan
    table.attrs["skipped"] = skipped
    return table


def _folder_images(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """PNG/JPEG/DICOM files under ``folder`` (recursively, hidden folders left out)
    and the other files with why each was skipped."""
    from .dicom import is_dicom

    images, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.name.upper() == "DICOMDIR":
            skipped.append((str(relative), "a DICOMDIR index, not an image"))
        elif path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path):
            images.append(path)
        else:
            kind = path.suffix or "no extension"
            skipped.append((str(relative), f"not PNG, JPEG or DICOM ({kind})"))
    return images, skipped


def _fill_from_header(row: dict[str, Any], default_male: bool | None, sex_override: bool,
                      chronological_age: float | None, id_from: str) -> None:
    """Sex, chronological age and id of one input row, from the DICOM header if any."""
    from .dicom import is_dicom, read_dicom_header

    given_male = row["male"] if row["male"] is not None else default_male
    if not is_dicom(row["path"]):
        row["male"] = given_male
        if row.get("chronological_age") is None or pd.isna(row.get("chronological_age")):
            row["chronological_age"] = chronological_age
        return
    try:
        header = read_dicom_header(row["path"])
    except BoneAgeError as err:
        raise DataError(str(err)) from None
    row["male"] = sex_with_header(given_male, header.sex_text, row["path"],
                                  "pass --sex-override", sex_override)
    row["chronological_age"] = header.chronological_age
    if id_from == "sop" and header.sop_instance_uid:
        row["id"] = header.sop_instance_uid


def _rows_from_csv(csv: Path) -> list[dict[str, Any]]:
    if not csv.is_file():
        raise DataError(f"input not found: {csv}. Give image files, folders of images or "
                        "a test CSV (Kaggle's boneage-test-dataset.csv, or id[,male]).")
    try:
        table = pd.read_csv(csv, dtype=str)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{csv}: not a readable CSV ({type(err).__name__}); expected "
                        "Kaggle's test CSV (Case ID,Sex) or id[,male] columns.") from None
    id_col = "Case ID" if "Case ID" in table else "id" if "id" in table else None
    if id_col is None:
        raise DataError(f"{csv}: no 'Case ID' (Kaggle test CSV) or 'id' column.")
    sex_col = "Sex" if "Sex" in table else "male" if "male" in table else None
    folders = [csv.parent / csv.stem, csv.parent / csv.stem / csv.stem, csv.parent / "images",
               csv.parent]
    rows = []
    for n, record in enumerate(table.to_dict("records"), start=2):
        image_id = str(record[id_col]).strip()
        path = next((f / f"{image_id}{s}" for f in folders for s in IMAGE_SUFFIXES
                     if (f / f"{image_id}{s}").is_file()), None)
        if path is None:
            raise DataError(f"{csv}, line {n}: no image for id {image_id} in "
                            + ", ".join(str(f) for f in folders[:3]) + ".")
        male = sex_or_error(record[sex_col], f"{csv}, line {n}") if sex_col else None
        age = record.get("chronological_age")
        try:
            age = float(age) if age not in (None, "") and not pd.isna(age) else None
        except ValueError:
            raise DataError(f"{csv}, line {n}: chronological_age {age!r} is not a number "
                            "of months.") from None
        rows.append({"id": image_id, "path": str(path), "male": male,
                     "chronological_age": age})
    return rows


def sex_column(table: pd.DataFrame, use_sex: bool) -> np.ndarray | None:
    """The ``male`` column of a :func:`collect_inputs` table for a model that takes the
    sex (None for one that does not); a missing value is an error, never a default."""
    if not use_sex:
        return None
    unknown = table["male"].isna()
    if unknown.any():
        raise DataError(f"this model needs the patient's sex; none given for "
                        f"{table.loc[unknown, 'id'].iloc[0]} (use --sex M|F, a CSV with a "
                        "Sex column, or DICOM files whose PatientSex is M or F).")
    return table["male"].astype(bool).to_numpy()


def predict_inputs(model_path: str | Path | Sequence[str | Path],
                   inputs: Iterable[str | Path], sex: str | None = None,
                   output: str | Path | None = None, progress: bool = True, tta: int = 1,
                   mc_samples: int = 0, sex_override: bool = False,
                   chronological_age: float | None = None,
                   id_from: str = "file", recalibrate: bool = False) -> pd.DataFrame:
    """Predict bone age for images (PNG, JPEG, DICOM), folders of them or test CSVs
    with a model or an ensemble; optionally write a CSV.

    Columns: id, [male], predicted; with TTA, several models or MC samples:
    predicted_no_tta, member_K, std, lower90, upper90; where a chronological age is
    known (DICOM header, ``chronological_age``, a CSV column): chronological_age and
    difference (bone age - chronological age, months); where an image looked inverted
    and was inverted back: warnings; where an image could not be read: error (its
    ``predicted`` is empty). ``recalibrate`` applies the run's (or export's)
    calibration: corrected months (``predicted_uncorrected`` keeps the model's) and
    its conformal 90% interval (``lower90``, ``upper90``)."""
    if output is not None:
        check_output_file(output, "--output")
    paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
    calibration = find_calibration(paths[0], len(paths), mc_samples, tta) if recalibrate \
        else None
    members = open_members(paths)
    table = collect_inputs(inputs, sex, sex_override, chronological_age, id_from)
    skipped = table.attrs.get("skipped", [])
    if skipped:
        log.warning("skipped %d file(s) that are not images: %s", len(skipped),
                    "; ".join(f"{name} ({why})" for name, why in skipped[:5])
                    + (" ..." if len(skipped) > 5 else ""))
    use_sex = any(m.preprocessing["use_sex"] for m in members)
    male = sex_column(table, use_sex)
    notes: dict[str, list[str]] = {}

    def read(path: str, image_size: int, geometry: str, random_crop: bool) -> np.ndarray:
        return load_image(path, image_size, geometry, random_crop, notes=notes)

    prediction = predict_images(members, table["path"].tolist(), male, tta=tta,
                                mc_samples=mc_samples, progress=progress, reader=read,
                                skip_unreadable=True)
    raw = prediction.predicted
    if calibration is not None:
        prediction.predicted, lower, upper = apply_calibration(calibration, raw,
                                                               prediction.std)
    result = pd.DataFrame({"id": table["id"], "predicted": prediction.predicted})
    if use_sex:
        result.insert(1, "male", male)
    result = pd.concat([result, extra_columns(prediction)], axis=1)
    if calibration is not None:
        result["predicted_uncorrected"] = raw
        result["lower90"], result["upper90"] = lower, upper
    ages = pd.to_numeric(table["chronological_age"], errors="coerce").to_numpy(float)
    if np.isfinite(ages).any():
        result["chronological_age"] = ages
        result["difference"] = prediction.predicted - ages
    if notes:
        result["warnings"] = ["; ".join(dict.fromkeys(notes.get(p, [])))
                              for p in table["path"]]
    if prediction.failed:
        result["error"] = [prediction.failed.get(i, "") for i in range(len(result))]
    if output is not None:
        write_csv(output, result)
    return result
