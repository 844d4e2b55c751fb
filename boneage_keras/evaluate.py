"""Predictions, metrics, figures and reports for a trained model.

    >>> result = evaluate_run("runs/default-20261122-101500")       # its val/test split
    >>> result.metrics["mae"], result.out_dir / "report.html"
    >>> predict_inputs("runs/x/best.keras", ["scan.png", "folder/"])  # DataFrame id, predicted
    >>> compare_predictions("runs/a", "runs/b")["overall"]            # bootstrap CI of MAE diff

Images always go through the preprocessing recorded in the model (size, pad/stretch,
crop), read from the model itself, never re-specified by the user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cache import reader_for
from .calibration import CalibrationError, apply_calibration, fit_calibration
from .config import geometry, load_config
from .data import AGE_GROUPS, CALIBRATION_MIN_IMAGES, DataError, load_dataset
from .files import check_output_dir, write_csv, write_json
from .images import load_image
from .inference import (
    KerasPredictor,
    ModelFileError,
    Prediction,
    as_members,
    extra_columns,
    open_members,
    open_model,
    predict_images,
)
from .metrics import (
    full_report,
    interval_calibration,
    recalibration_report,
    regression_report,
)
from .plots import (
    plot_age_groups,
    plot_bland_altman,
    plot_curves,
    plot_error_histogram,
    plot_examples,
    plot_scatter,
)

log = logging.getLogger(__name__)
SPLIT_NOTES = {
    "val": "validation split, used for model selection: optimistic (it chose the "
           "checkpoint and stopped training); give the run a test split "
           "(data.test_fraction) for an unbiased figure",
    "test": "test split: held out from training and model selection",
    "selection": "selection split: held out from training and checkpoint choice, "
                 "for comparing finished recipes (the test split, if any, stays "
                 "untouched)",
}
FIGURES = ("scatter.png", "age_groups.png", "error_histogram.png", "bland_altman.png",
           "examples.png")


@dataclass
class EvaluationResult:
    out_dir: Path
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    files: list[Path]


def predictions_table(table: pd.DataFrame, prediction: Prediction,
                      tolerance_months: float) -> pd.DataFrame:
    """id, male, boneage, predicted, error, within_tolerance, then predicted_no_tta (TTA),
    member_K (ensembles), std, lower90, upper90 where they apply."""
    error = prediction.predicted - table["boneage"].to_numpy(np.float64)
    preds = pd.DataFrame({
        "id": table["id"].to_numpy(), "male": table["male"].to_numpy(bool),
        "boneage": table["boneage"].to_numpy(np.float64), "predicted": prediction.predicted,
        "error": error, "within_tolerance": np.abs(error) <= tolerance_months,
    })
    return pd.concat([preds, extra_columns(prediction)], axis=1)


def _example_figure(table: pd.DataFrame, preds: pd.DataFrame, out_png: Path,
                    explainer: Any = None, per_row: int = 6) -> Path:
    order = np.argsort(np.abs(preds["error"].to_numpy()))
    k = min(per_row, max(1, len(order) // 2))
    chosen = list(order[:k]) + list(order[::-1][:k])
    images, captions = [], []
    for i in chosen:
        images.append(load_image(table["path"].iloc[i], 160))
        row = preds.iloc[i]
        captions.append(f"id {row['id']}\ntrue {row['boneage']:.0f} / pred "
                        f"{row['predicted']:.0f}")
    heatmaps = None
    if explainer is not None:
        from .explain import grad_cam, resize_maps

        pre = explainer.preprocessing
        inputs = np.stack([load_image(table["path"].iloc[i], pre["image_size"],
                                      pre["geometry"], pre["random_crop"]) for i in chosen])
        male = table["male"].to_numpy(np.float32)[chosen] if pre["use_sex"] else None
        cams, _ = grad_cam(explainer.model, inputs.astype(np.float32), male)
        heatmaps = list(resize_maps(cams, (160, 160)))
    return plot_examples(images, captions, k, out_png, heatmaps=heatmaps)


def _extra_metrics(preds: pd.DataFrame, prediction: Prediction, mc_samples: int,
                   tolerance_months: float) -> dict[str, Any]:
    truth = preds["boneage"].to_numpy(np.float64)
    extra: dict[str, Any] = {}
    if prediction.views > 1:
        extra["tta"] = {"views": prediction.views,
                        "mae": float(np.mean(np.abs(prediction.predicted - truth))),
                        "mae_without_tta": float(np.mean(np.abs(prediction.no_tta - truth)))}
    if len(prediction.members) > 1:
        extra["ensemble"] = {
            "mae": float(np.mean(np.abs(prediction.predicted - truth))),
            "members": [{"model": name,
                         **{k: v for k, v in regression_report(
                             truth, member, tolerance_months).items()
                            if k in ("mae", "rmse", "r2", "tolerance_accuracy")}}
                        for name, member in zip(prediction.names, prediction.members)]}
    if prediction.std is not None:
        source = " + ".join(s for s, on in (
            (f"MC dropout ({mc_samples} samples)", mc_samples > 1),
            (f"ensemble spread ({len(prediction.members)} models)",
             len(prediction.members) > 1)) if on)
        extra["uncertainty"] = {"source": source, **interval_calibration(
            truth, prediction.predicted, prediction.std)}
    return extra


def evaluate_table(model: Any, table: pd.DataFrame, out_dir: Path,
                   tolerance_months: float = 12.0, title: str = "evaluation",
                   config_summary: dict[str, Any] | None = None,
                   history_csv: Path | None = None,
                   cache_dir: str | Path | None = None,
                   data_dir: str | Path | None = None, tta: int = 1,
                   mc_samples: int = 0, split_note: str | None = None,
                   calibration: dict[str, Any] | None = None) -> EvaluationResult:
    """Predict ``table`` (id, boneage, male, path) with a model or an ensemble (a list),
    write metrics, predictions, figures and report (``split_note``: what the evaluated
    images are, e.g. that they chose the checkpoint, said in metrics.json and report).

    Images come from a prepared cache of ``data_dir`` when one fits the model. With
    ``tta`` > 1 the metrics also hold MAE without TTA; with ``mc_samples`` > 1 or
    several models, per-image std and 90% intervals and their calibration."""
    from .plots import plot_calibration
    from .report import write_report

    check_output_dir(out_dir, "--out")
    members = as_members(model)
    notes: dict[str, list[str]] = {}

    def with_notes(reader: Any) -> Any:
        if reader is not load_image:      # a prepared cache was corrected when built
            return reader
        return lambda path, image_size, geometry, random_crop: load_image(
            path, image_size, geometry, random_crop, notes=notes)

    readers = [with_notes(reader_for(table, data_dir, m.preprocessing["image_size"],
                                     m.preprocessing["geometry"], cache_dir))
               for m in members]
    prediction = predict_images(members, table["path"].tolist(), table["male"].to_numpy(),
                                tta=tta, mc_samples=mc_samples, reader=readers)
    raw = prediction.predicted.copy()
    if calibration is not None:
        corrected, lower, upper = apply_calibration(calibration, raw, prediction.std)
        prediction.predicted = corrected
    preds = predictions_table(table, prediction, tolerance_months)
    if calibration is not None:
        preds["predicted_uncorrected"] = raw
        preds["lower90"], preds["upper90"] = lower, upper
    inverted = table.loc[table["path"].isin(notes), "id"].astype(str).tolist()
    if inverted:
        log.warning("%d image(s) looked inverted (bright background, dark bones) and were "
                    "inverted back: %s", len(inverted), ", ".join(inverted[:10]))
    metrics = full_report(preds["boneage"], preds["predicted"], preds["male"],
                          tolerance_months)
    metrics.update(_extra_metrics(preds, prediction, mc_samples, tolerance_months))
    if calibration is not None:
        metrics["recalibration"] = recalibration_report(
            preds["boneage"].to_numpy(), raw, preds["predicted"].to_numpy(), lower, upper,
            calibration, tolerance_months)
    metrics["title"] = title
    metrics["inverted_images"] = len(inverted)
    if split_note:
        metrics["split_note"] = split_note
    write_csv(out_dir / "predictions.csv", preds)
    write_json(out_dir / "metrics.json", metrics)
    files = [out_dir / "predictions.csv", out_dir / "metrics.json"]
    files.append(plot_scatter(preds["boneage"], preds["predicted"], out_dir / FIGURES[0]))
    files.append(plot_age_groups(metrics["by_age_group"], out_dir / FIGURES[1],
                                 tolerance_months))
    files.append(plot_error_histogram(preds["error"], out_dir / FIGURES[2]))
    files.append(plot_bland_altman(preds["boneage"], preds["predicted"], out_dir / FIGURES[3]))
    explainer = next((m for m in members if isinstance(m, KerasPredictor)), None)
    files.append(_example_figure(table, preds, out_dir / FIGURES[4], explainer))
    if "uncertainty" in metrics:
        files.append(plot_calibration(metrics["uncertainty"], np.abs(preds["error"]),
                                      preds["std"], out_dir / "calibration.png"))
    if history_csv is not None and history_csv.is_file():
        files.append(plot_curves(history_csv, out_dir / "curves.png"))
    files.append(write_report(out_dir, metrics, [f for f in files if f.suffix == ".png"],
                              config_summary or {}))
    return EvaluationResult(out_dir, metrics, preds, files)


def held_out_split(splits: pd.Series) -> str:
    """The split that scores a run: selection (for comparing recipes; the test split
    stays untouched), else test, else validation (optimistic: it chose the
    checkpoint)."""
    present = set(splits)
    for name in ("selection", "test"):
        if name in present:
            return name
    return "val"


def _split_rows(split_csv: Path, split: str) -> pd.DataFrame:
    rows = pd.read_csv(split_csv, dtype={"id": str})
    if split == "auto":
        split = held_out_split(rows["split"])
    if split != "all":
        rows = rows[rows["split"] == split]
    if rows.empty:
        raise DataError(f"{split_csv}: no rows in split '{split}'. Choose one of "
                        f"{', '.join(sorted(set(pd.read_csv(split_csv)['split'])))} or all.")
    return rows


def _attach_paths(rows: pd.DataFrame, data_dir: str | Path | None,
                  cache_dir: str | Path | None = None) -> pd.DataFrame:
    """The split's rows with their image paths; the decode record goes to the run's
    ``data.cache_dir`` (where training kept it), not into the data folder."""
    table, _, _ = load_dataset(data_dir, cache_dir=cache_dir)
    merged = rows[["id"]].merge(table, on="id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise DataError(f"{int(missing.sum())} id(s) of the split are not in the data at "
                        f"{data_dir} (e.g. {merged.loc[missing, 'id'].iloc[0]}); pass "
                        "--data-dir with the data the run was trained on.")
    return merged


def evaluate_run(run_dir: str | Path | Sequence[str | Path], split: str = "auto",
                 data_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 tolerance_months: float | None = None, tta: int = 1,
                 mc_samples: int = 0, recalibrate: bool = False) -> EvaluationResult:
    """Evaluate a run's best.keras on its own split (test if it has one, else val).

    Several run directories form an ensemble, evaluated on the first run's split; every
    run must have held those images out of its training (same split), else it is an
    error, since the ensemble's figures would be optimistic. ``recalibrate`` fits the
    linear correction and the conformal 90% interval on the run's calibration split
    (with its validation split where the run kept its last epoch; else its validation
    split; stored in the first run's calibration.json) and
    scores them on the selection or test split."""
    runs = [Path(r) for r in ([run_dir] if isinstance(run_dir, (str, Path)) else run_dir)]
    for run in runs:
        if not (run / "config.yaml").is_file() or not (run / "split.csv").is_file():
            raise ModelFileError(f"{run} is not a run directory (config.yaml and split.csv "
                                 "expected); pass one written by `boneage train`, or use "
                                 "--model FILE --data-dir DIR.")
    first = runs[0]
    cfg = load_config(first / "config.yaml")
    rows = _split_rows(first / "split.csv", split)
    evaluated = set(rows["split"])
    for run in runs[1:]:
        _check_held_out(rows, run)
    models = [KerasPredictor(open_model(run / "best.keras"), run.name) for run in runs]
    table = _attach_paths(rows, data_dir or cfg.data.data_dir, cfg.data.cache_dir)
    tolerance = tolerance_months or cfg.train.tolerance_months
    summary = {"run": ", ".join(map(str, runs)), "split": split,
               "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
               "weights": cfg.model.weights, "use_sex": cfg.model.use_sex,
               "epochs": cfg.train.epochs, "loss": cfg.train.loss,
               "learning_rate": cfg.train.learning_rate, "tta views": tta,
               "MC dropout samples": mc_samples}
    if out_dir is None and len(runs) > 1:
        raise DataError("an ensemble of runs needs --out DIR for its evaluation.")
    name = first.name if len(runs) == 1 else f"ensemble of {len(runs)} runs"
    cached_data, cache_dir = _cache_of(cfg, data_dir)
    calibration = None
    if recalibrate:
        if evaluated not in ({"test"}, {"selection"}):
            raise DataError("--recalibrate scores the calibration on the selection or "
                            f"test split; {first} has neither (train with "
                            "data.selection_size or data.test_fraction > 0).")
        calibration = _fit_run_calibration(first, cfg, models, data_dir, tta, mc_samples)
        summary["recalibration"] = (f"fitted on the {calibration['fitted_on']}, scored on "
                                    f"{next(iter(evaluated))}")
    return evaluate_table(models if len(models) > 1 else models[0], table,
                          Path(out_dir) if out_dir else first, tolerance,
                          title=f"{name} ({split})", config_summary=summary,
                          history_csv=first / "history.csv" if len(runs) == 1 else None,
                          cache_dir=cache_dir, data_dir=cached_data, tta=tta,
                          mc_samples=mc_samples, calibration=calibration,
                          split_note=SPLIT_NOTES.get(next(iter(evaluated)))
                          if len(evaluated) == 1 else None)


def _cache_of(cfg: Any, data_dir: str | Path | None) -> tuple[Any, Any]:
    """(the data folder, the cache folder) a run's prepared cache is looked up with;
    (None, None) where the run does not read a cache."""
    if not cfg.data.use_cache:
        return None, None
    return data_dir or cfg.data.data_dir, cfg.data.cache_dir


def calibration_splits(splits: pd.Series, monitor: str) -> tuple[str, ...]:
    """The splits a run's calibration is fitted on: its calibration split (held out from
    training and from choosing the checkpoint), joined by its validation split where
    the run keeps its last epoch (``train.monitor: last``, no early stopping: the
    validation images chose nothing, and three times the images steady the fit); the
    validation split alone where a run has no calibration split (where it chose the
    checkpoint, its residuals are a little small)."""
    present = set(splits)
    if "calibration" not in present:
        return ("val",)
    return ("calibration", "val") if monitor == "last" and "val" in present \
        else ("calibration",)


def fitted_on(names: Sequence[str]) -> str:
    """How calibration.json names the splits it was fitted on."""
    words = ["validation" if n == "val" else n for n in names]
    return f"{' and '.join(words)} split{'s' if len(words) > 1 else ''}"


def _fit_run_calibration(run: Path, cfg: Any, models: list[KerasPredictor],
                         data_dir: str | Path | None, tta: int, mc_samples: int
                         ) -> dict[str, Any]:
    """Fit the run's linear correction and conformal 90% interval (calibration.json;
    per group of corrected age unless MC dropout or an ensemble gives each image a
    std)."""
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    names = calibration_splits(split["split"], cfg.train.monitor)
    rows = _attach_paths(split[split["split"].isin(names)],
                         data_dir or cfg.data.data_dir, cfg.data.cache_dir)
    cached_data, cache_dir = _cache_of(cfg, data_dir)
    fit = predict_images(models if len(models) > 1 else models[0], rows["path"].tolist(),
                         rows["male"].to_numpy(), tta=tta, mc_samples=mc_samples,
                         reader=reader_for(rows, cached_data, cfg.data.image_size,
                                           geometry(cfg.data), cache_dir))
    calibration = fit_calibration(rows["boneage"].to_numpy(), fit.predicted, fit.std,
                                  fitted_on=fitted_on(names), age_groups=AGE_GROUPS)
    calibration.update(tta=tta, mc_samples=mc_samples, members=len(models))
    write_json(run / "calibration.json", calibration)
    return calibration


def calibrate_run(run_dir: str | Path, data_dir: str | Path | None = None,
                  tta: int = 1, mc_samples: int = 0) -> dict[str, Any]:
    """Fit a finished run's bias correction and conformal 90% interval on its
    calibration split (and its validation split under ``train.monitor: last``, see
    :func:`calibration_splits`), with best.keras, into its calibration.json (what
    ``predict --recalibrate`` and an export's model.json carry). Raises
    CalibrationError where none can be fitted (too few images, a model that does not
    yet follow age)."""
    run = Path(run_dir)
    splits = pd.read_csv(run / "split.csv", dtype={"id": str})["split"]
    if "calibration" not in set(splits):
        raise CalibrationError(
            f"{run} has no calibration split, held out from training and from choosing "
            "the checkpoint, to fit one on (data.calibration_fraction cuts one where it "
            f"gets at least {CALIBRATION_MIN_IMAGES} images).")
    cfg = load_config(run / "config.yaml")
    model = KerasPredictor(open_model(run / "best.keras"), run.name)
    return _fit_run_calibration(run, cfg, [model], data_dir, tta, mc_samples)


def _check_held_out(rows: pd.DataFrame, run: Path) -> None:
    other = pd.read_csv(run / "split.csv", dtype={"id": str})
    trained = set(other.loc[other["split"] == "train", "id"]) & set(rows["id"])
    if trained:
        raise DataError(f"{run} trained on {len(trained)} of the images being evaluated "
                        f"(e.g. id {min(trained)}): ensemble runs must share the "
                        "split (same data, data.split, fractions and train.seed).")


def evaluate_model(model_path: str | Path | Sequence[str | Path], data_dir: str | Path,
                   split: str = "all", out_dir: str | Path = "evaluation",
                   tolerance_months: float = 12.0, tta: int = 1,
                   mc_samples: int = 0) -> EvaluationResult:
    """Evaluate a model (``.keras``, SavedModel or ONNX), or an ensemble of them, on a
    labelled data folder (``split`` val/test needs the run's split.csv beside the
    first model file)."""
    paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
    members = open_members(paths)
    table, _, _ = load_dataset(data_dir)
    if split != "all":
        split_csv = Path(paths[0]).parent / "split.csv"
        if not split_csv.is_file():
            raise DataError(f"--split {split} needs the run's split.csv beside {paths[0]}; "
                            "none found. Use --split all to evaluate every labelled image.")
        rows = _split_rows(split_csv, split)
        table = rows[["id"]].merge(table, on="id", how="inner")
        if table.empty:
            raise DataError(f"no image of split '{split}' ({split_csv}) is in {data_dir}.")
    summary = {"model": ", ".join(map(str, paths)), "data": str(data_dir), "split": split,
               **members[0].preprocessing, "tta views": tta, "MC dropout samples": mc_samples}
    name = Path(paths[0]).name if len(paths) == 1 else f"ensemble of {len(paths)} models"
    return evaluate_table(members if len(members) > 1 else members[0], table, Path(out_dir),
                          tolerance_months, title=f"{name} on {Path(data_dir).name} ({split})",
                          config_summary=summary, data_dir=data_dir, tta=tta,
                          mc_samples=mc_samples)
