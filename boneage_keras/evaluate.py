"""Predictions, metrics, figures and reports for a trained model.

    >>> result = evaluate_run("runs/default-20261122-101500")       # its val/test split
    >>> result.metrics["mae"], result.out_dir / "report.html"
    >>> predict_inputs("runs/x/best.keras", ["scan.png", "folder/"])  # DataFrame id, predicted
    >>> compare_predictions("runs/a", "runs/b")["overall"]            # bootstrap CI of MAE diff

Images always go through the preprocessing recorded in the model (size, pad/stretch,
crop), read from the model itself, never re-specified by the user.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from .cache import reader_for
from .config import load_config
from .data import (
    AGE_GROUPS,
    IMAGE_SUFFIXES,
    DataError,
    age_group_label,
    assign_age_group,
    load_dataset,
)
from .images import load_image
from .metrics import full_report, paired_bootstrap_mae
from .model import load_model, preprocessing_of
from .plots import (
    plot_age_groups,
    plot_bland_altman,
    plot_curves,
    plot_error_histogram,
    plot_examples,
    plot_scatter,
)

log = logging.getLogger(__name__)
FIGURES = ("scatter.png", "age_groups.png", "error_histogram.png", "bland_altman.png",
           "examples.png")


class ModelFileError(ValueError):
    """A model file is missing or is not a bone-age model."""


@dataclass
class EvaluationResult:
    out_dir: Path
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    files: list[Path]


class KerasPredictor:
    """A ``.keras`` bone-age model: ``predict_batch(images, male) -> months``."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.preprocessing = preprocessing_of(model)

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        inputs: Any = images
        if self.preprocessing["use_sex"]:
            inputs = {"image": images, "male": male}
        return np.asarray(keras.ops.convert_to_numpy(self.model.predict_on_batch(inputs)))


class SavedModelPredictor:
    """An exported SavedModel, through its ``preprocessed`` signature."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        import tensorflow as tf

        self.tf = tf
        self.signature = tf.saved_model.load(str(path)).signatures["preprocessed"]
        self.preprocessing = _preprocessing_from_meta(meta)

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        kwargs = {"image": self.tf.constant(images)}
        if self.preprocessing["use_sex"]:
            kwargs["male"] = self.tf.constant(male)
        return self.signature(**kwargs)["boneage"].numpy()


class OnnxPredictor:
    """An exported ONNX model in onnxruntime."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelFileError("onnxruntime is not installed: pip install onnxruntime "
                                 f"to run {path}.") from None
        self.session = onnxruntime.InferenceSession(str(path))
        self.names = [i.name for i in self.session.get_inputs()]
        self.preprocessing = _preprocessing_from_meta(meta)

    def predict_batch(self, images: np.ndarray, male: np.ndarray | None) -> np.ndarray:
        feeds = {self.names[0]: images}
        if self.preprocessing["use_sex"]:
            feeds[self.names[1]] = male
        return self.session.run(None, feeds)[0]


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
    return KerasPredictor(open_model(path))


def predict_paths(predictor: Any, paths: Sequence[str], male: np.ndarray | None = None,
                  batch_size: int = 32, progress: bool = True,
                  reader: Callable[..., np.ndarray] = load_image) -> np.ndarray:
    """Bone age (months) for each image file, decoded as the model was trained
    (``reader``: ``load_image`` or a prepared cache's ``load``)."""
    if isinstance(predictor, keras.Model):
        predictor = KerasPredictor(predictor)
    pre = predictor.preprocessing
    if pre["use_sex"] and male is None:
        raise DataError("this model takes the patient's sex as a second input; give it "
                        "(a male/Sex column, or --sex M|F for single images).")
    size, resize, crop = pre["image_size"], pre["resize"], pre["crop"]
    bar = keras.utils.Progbar(len(paths), unit_name="image") if progress else None
    out = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = np.stack(list(pool.map(lambda p: reader(p, size, resize, crop),
                                            chunk))).astype(np.float32)
            sex = None
            if pre["use_sex"]:
                sex = np.asarray(male[start:start + batch_size], np.float32).reshape(-1, 1)
            out.append(np.asarray(predictor.predict_batch(images, sex)).reshape(-1))
            if bar is not None:
                bar.add(len(chunk))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predictions_table(table: pd.DataFrame, predicted: np.ndarray,
                      tolerance_months: float) -> pd.DataFrame:
    error = predicted - table["boneage"].to_numpy(np.float64)
    return pd.DataFrame({
        "id": table["id"].to_numpy(), "male": table["male"].to_numpy(bool),
        "boneage": table["boneage"].to_numpy(np.float64), "predicted": predicted,
        "error": error, "within_tolerance": np.abs(error) <= tolerance_months,
    })


def _example_figure(table: pd.DataFrame, preds: pd.DataFrame, out_png: Path,
                    per_row: int = 6) -> Path:
    order = np.argsort(np.abs(preds["error"].to_numpy()))
    k = min(per_row, max(1, len(order) // 2))
    chosen = list(order[:k]) + list(order[::-1][:k])
    images, captions = [], []
    for i in chosen:
        images.append(load_image(table["path"].iloc[i], 160))
        row = preds.iloc[i]
        captions.append(f"id {row['id']}\ntrue {row['boneage']:.0f} / pred "
                        f"{row['predicted']:.0f}")
    return plot_examples(images, captions, k, out_png)


def evaluate_table(model: Any, table: pd.DataFrame, out_dir: Path,
                   tolerance_months: float = 12.0, title: str = "evaluation",
                   config_summary: dict[str, Any] | None = None,
                   history_csv: Path | None = None,
                   cache_dir: str | Path | None = None,
                   data_dir: str | Path | None = None) -> EvaluationResult:
    """Predict ``table`` (id, boneage, male, path), write metrics, figures and report.

    Images come from a prepared cache of ``data_dir`` when one fits the model."""
    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, keras.Model):
        model = KerasPredictor(model)
    pre = model.preprocessing
    reader = reader_for(table, data_dir, pre["image_size"], pre["resize"], cache_dir)
    predicted = predict_paths(model, table["path"].tolist(), table["male"].to_numpy(),
                              reader=reader)
    preds = predictions_table(table, predicted, tolerance_months)
    metrics = full_report(preds["boneage"], preds["predicted"], preds["male"],
                          tolerance_months)
    metrics["title"] = title
    preds.to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    files = [out_dir / "predictions.csv", out_dir / "metrics.json"]
    files.append(plot_scatter(preds["boneage"], preds["predicted"], out_dir / FIGURES[0]))
    files.append(plot_age_groups(metrics["by_age_group"], out_dir / FIGURES[1],
                                 tolerance_months))
    files.append(plot_error_histogram(preds["error"], out_dir / FIGURES[2]))
    files.append(plot_bland_altman(preds["boneage"], preds["predicted"], out_dir / FIGURES[3]))
    files.append(_example_figure(table, preds, out_dir / FIGURES[4]))
    if history_csv is not None and history_csv.is_file():
        files.append(plot_curves(history_csv, out_dir / "curves.png"))
    files.append(write_report(out_dir, metrics, [f for f in files if f.suffix == ".png"],
                              config_summary or {}))
    return EvaluationResult(out_dir, metrics, preds, files)


def _split_rows(split_csv: Path, split: str) -> pd.DataFrame:
    rows = pd.read_csv(split_csv, dtype={"id": str})
    if split == "auto":
        split = "test" if (rows["split"] == "test").any() else "val"
    if split != "all":
        rows = rows[rows["split"] == split]
    if rows.empty:
        raise DataError(f"{split_csv}: no rows in split '{split}'. Choose one of "
                        f"{', '.join(sorted(set(pd.read_csv(split_csv)['split'])))} or all.")
    return rows


def _attach_paths(rows: pd.DataFrame, data_dir: str | Path | None) -> pd.DataFrame:
    table, _, _ = load_dataset(data_dir)
    merged = rows[["id"]].merge(table, on="id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise DataError(f"{int(missing.sum())} id(s) of the split are not in the data at "
                        f"{data_dir} (e.g. {merged.loc[missing, 'id'].iloc[0]}); pass "
                        "--data-dir with the data the run was trained on.")
    return merged


def evaluate_run(run_dir: str | Path, split: str = "auto", data_dir: str | Path | None = None,
                 out_dir: str | Path | None = None,
                 tolerance_months: float | None = None) -> EvaluationResult:
    """Evaluate a run's best.keras on its own split (test if it has one, else val)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "split.csv").is_file():
        raise ModelFileError(f"{run_dir} is not a run directory (config.yaml and split.csv "
                             "expected); pass one written by `cli.py train`, or use "
                             "--model FILE --data-dir DIR.")
    cfg = load_config(run_dir / "config.yaml")
    model = open_model(run_dir / "best.keras")
    rows = _split_rows(run_dir / "split.csv", split)
    table = _attach_paths(rows, data_dir or cfg.data.data_dir)
    tolerance = tolerance_months or cfg.train.tolerance_months
    summary = {"run": str(run_dir), "split": split, "backbone": cfg.model.backbone,
               "image_size": cfg.data.image_size, "weights": cfg.model.weights,
               "use_sex": cfg.model.use_sex, "epochs": cfg.train.epochs,
               "loss": cfg.train.loss, "learning_rate": cfg.train.learning_rate}
    return evaluate_table(model, table, Path(out_dir) if out_dir else run_dir, tolerance,
                          title=f"{run_dir.name} ({split})", config_summary=summary,
                          history_csv=run_dir / "history.csv",
                          cache_dir=cfg.data.cache_dir if cfg.data.use_cache else None,
                          data_dir=(data_dir or cfg.data.data_dir) if cfg.data.use_cache
                          else None)


def evaluate_model(model_path: str | Path, data_dir: str | Path, split: str = "all",
                   out_dir: str | Path = "evaluation",
                   tolerance_months: float = 12.0) -> EvaluationResult:
    """Evaluate a model (``.keras``, SavedModel or ONNX) on a labelled data folder
    (``split`` val/test needs the run's split.csv beside the model file)."""
    model = open_predictor(model_path)
    table, _, _ = load_dataset(data_dir)
    if split != "all":
        split_csv = Path(model_path).parent / "split.csv"
        if not split_csv.is_file():
            raise DataError(f"--split {split} needs the run's split.csv beside {model_path}; "
                            "none found. Use --split all to evaluate every labelled image.")
        rows = _split_rows(split_csv, split)
        table = rows[["id"]].merge(table, on="id", how="inner")
        if table.empty:
            raise DataError(f"no image of split '{split}' ({split_csv}) is in {data_dir}.")
    summary = {"model": str(model_path), "data": str(data_dir), "split": split,
               **model.preprocessing}
    return evaluate_table(model, table, Path(out_dir), tolerance_months,
                          title=f"{Path(model_path).name} on {Path(data_dir).name} ({split})",
                          config_summary=summary, data_dir=data_dir)


def _parse_sex(value: Any, where: str) -> bool:
    text = str(value).strip().upper()
    if text in ("M", "MALE", "TRUE", "1"):
        return True
    if text in ("F", "FEMALE", "FALSE", "0"):
        return False
    raise DataError(f"{where}: sex {value!r} is not M/F (or male True/False).")


def collect_inputs(inputs: Iterable[str | Path], sex: str | None = None) -> pd.DataFrame:
    """Image files, folders of images, or a Kaggle test CSV -> table id, path, male.

    The Kaggle test layout is ``boneage-test-dataset.csv`` (``Case ID``, ``Sex``) with
    images in ``boneage-test-dataset/`` beside it; a labels CSV with ``id`` and
    ``male`` columns and images in ``images/`` works too.
    """
    rows: list[dict[str, Any]] = []
    default_male = _parse_sex(sex, "--sex") if sex is not None else None
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            rows.extend(_rows_from_csv(item))
        elif item.is_dir():
            files = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{item}: folder holds no .png/.jpg images.")
            rows.extend({"id": p.stem, "path": str(p), "male": default_male} for p in files)
        elif item.is_file():
            rows.append({"id": item.stem, "path": str(item), "male": default_male})
        else:
            raise DataError(f"input not found: {item}. Give image files, folders of images "
                            "or a test CSV.")
    if not rows:
        raise DataError("no input given: pass image files, folders or a test CSV.")
    return pd.DataFrame(rows)


def _rows_from_csv(csv: Path) -> list[dict[str, Any]]:
    table = pd.read_csv(csv, dtype=str)
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
        male = _parse_sex(record[sex_col], f"{csv}, line {n}") if sex_col else None
        rows.append({"id": image_id, "path": str(path), "male": male})
    return rows


def predict_inputs(model_path: str | Path, inputs: Iterable[str | Path],
                   sex: str | None = None, output: str | Path | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Predict bone age for images/folders/test CSVs; optionally write a CSV."""
    model = open_predictor(model_path)
    table = collect_inputs(inputs, sex)
    use_sex = model.preprocessing["use_sex"]
    male = None
    if use_sex:
        unknown = table["male"].isna()
        if unknown.any():
            raise DataError(f"this model needs the patient's sex; none given for "
                            f"{table.loc[unknown, 'id'].iloc[0]} (use --sex M|F or a CSV "
                            "with a Sex column).")
        male = table["male"].astype(bool).to_numpy()
    predicted = predict_paths(model, table["path"].tolist(), male, progress=progress)
    result = pd.DataFrame({"id": table["id"], "predicted": predicted})
    if use_sex:
        result.insert(1, "male", male)
    if output is not None:
        result.to_csv(output, index=False)
    return result


def _read_predictions(source: str | Path) -> tuple[pd.DataFrame, str]:
    path = Path(source)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise DataError(f"no predictions at {path}: run `cli.py evaluate` on that run first, "
                        "or pass a predictions.csv.")
    table = pd.read_csv(path, dtype={"id": str})
    missing = [c for c in ("id", "boneage", "predicted") if c not in table]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected a "
                        "predictions.csv written by `cli.py evaluate`.")
    return table, str(path)


def compare_predictions(a: str | Path, b: str | Path, n_resamples: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of MAE(B) - MAE(A) on the ids both predicted, overall and per
    age group; ids present in only one file are listed, not silently dropped."""
    table_a, path_a = _read_predictions(a)
    table_b, path_b = _read_predictions(b)
    both = table_a.merge(table_b, on="id", suffixes=("_a", "_b"))
    if both.empty:
        raise DataError(f"{path_a} and {path_b} share no ids; compare predictions of the "
                        "same images.")
    disagree = np.abs(both["boneage_a"] - both["boneage_b"]) > 1e-6
    if disagree.any():
        raise DataError(f"{path_a} and {path_b} disagree on the true age of id "
                        f"{both.loc[disagree, 'id'].iloc[0]}: not the same labels.")
    truth = both["boneage_a"].to_numpy(np.float64)
    err_a = np.abs(both["predicted_a"].to_numpy(np.float64) - truth)
    err_b = np.abs(both["predicted_b"].to_numpy(np.float64) - truth)
    result: dict[str, Any] = {
        "a": path_a, "b": path_b,
        "only_in_a": sorted(set(table_a["id"]) - set(table_b["id"])),
        "only_in_b": sorted(set(table_b["id"]) - set(table_a["id"])),
        "overall": paired_bootstrap_mae(err_a, err_b, n_resamples, seed),
        "by_age_group": {},
    }
    groups = assign_age_group(truth)
    for low, high in AGE_GROUPS:
        label = age_group_label(low, high)
        mask = groups == label
        result["by_age_group"][label] = (
            paired_bootstrap_mae(err_a[mask], err_b[mask], n_resamples, seed)
            if mask.sum() >= 2 else {"n": int(mask.sum())})
    return result
