"""The experiment runner: train several recipes on one split, evaluate them on the same
held-out images, and compare them side by side.

    >>> result = run_benchmark(["resnet18-baseline", "resnet18-improved"],
    ...                        ["data.data_dir=DIR", "train.epochs=3"], "runs/study2")
    >>> result["rows"]          # one per variant: MAE, RMSE, R2, +-12 accuracy, bias, min
    >>> result["comparisons"]   # paired bootstrap of each variant against the first

A variant is ``CONFIG`` (a file or packaged recipe; named after it) or
``NAME=CONFIG[,KEY=VALUE...]`` with its own overrides on top of the shared ones. Every
variant trains on the first variant's split (so their held-out images are the same),
unless it changes how the training images are split (``SPLIT_KEYS``): then it splits
anew around the same selection split. All are evaluated on the selection split (1,000
images set aside before training), or with ``data.selection_size=0`` on the first's
test split, or on validation (said to be optimistic) when it has neither. Running the
same command again continues: finished runs and evaluations are reused, a half-trained
run is resumed. Writes ``benchmark.json`` and ``report.html`` (the table, the
comparisons and the learning curves overlaid).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .calibration import CalibrationError, apply_calibration
from .compare import compare_predictions
from .config import ConfigError, load_config, parse_override
from .evaluate import SPLIT_NOTES, calibrate_run, evaluate_run, held_out_split
from .files import check_output_dir, write_json
from .metrics import recalibration_report
from .rundir import read_state, run_complete
from .train import resume, train

log = logging.getLogger(__name__)
DEFAULT_VARIANTS = ("image=cpu-bench,model.use_sex=false", "image+sex=cpu-bench")
# the selection split every variant is scored on, unless --set data.selection_size=...
SELECTION_IMAGES = 1000
# how the images left after the selection split are split: a variant that changes one
# of these gets a split of its own (around the same selection split)
SPLIT_KEYS = ("split", "val_fraction", "test_fraction", "calibration_fraction",
              "max_images")
# which images the selection split holds: every variant must agree with the first
HELD_OUT_KEYS = ("data_dir", "age_range", "selection_size")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``a=1,scale=[0.9,1.1]`` -> two parts."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``NAME=CONFIG,KEY=VALUE,...`` or ``CONFIG`` -> (name, config, overrides); a value
    may be a list in brackets (``augment.scale=[0.9,1.1]``)."""
    head, *overrides = _split_top_level(text)
    name, _, config = head.partition("=") if "=" in head else ("", "", head)
    if not config:
        raise ConfigError(f"variant {text!r}: expected NAME=CONFIG[,KEY=VALUE...] or "
                          "CONFIG (a file or a packaged recipe name).")
    for override in overrides:
        parse_override(override)          # a clear error now, not after hours
    name = name or Path(config).name.removesuffix(".yaml")
    if not name.replace("+", "").replace("-", "").replace("_", "").replace(".", "") \
            .isalnum():
        raise ConfigError(f"variant name {name!r}: use letters, digits, + - _ . only (it "
                          "names the run folder).")
    return name, config, overrides


def _minutes(run_dir: Path) -> float | None:
    try:
        info = json.loads((run_dir / "run.json").read_text())
        started = datetime.datetime.fromisoformat(info["started"])
        ended = datetime.datetime.fromisoformat(info["ended"])
    except (OSError, KeyError, ValueError):
        return None
    return (ended - started).total_seconds() / 60


def _with_calibration(run_dir: Path, eval_dir: Path, metrics: dict[str, Any], tta: int,
                      mc_samples: int) -> dict[str, Any]:
    """``metrics`` with the run's calibration (bias correction and 90% interval, fitted
    on its calibration split, with the validation split where it kept its last epoch)
    scored on the same held-out images; the main figures stay
    the model's own, so variants compare as trained."""
    try:
        cal = calibrate_run(run_dir, tta=tta, mc_samples=mc_samples)
    except CalibrationError as err:
        log.warning("'%s': no calibration: %s", run_dir.name, err)
        return metrics
    preds = pd.read_csv(eval_dir / "predictions.csv")
    std = preds["std"].to_numpy() if cal["interval"] == "scaled" else None
    corrected, lower, upper = apply_calibration(cal, preds["predicted"].to_numpy(), std)
    metrics = {**metrics, "recalibration": recalibration_report(
        preds["boneage"].to_numpy(), preds["predicted"].to_numpy(), corrected, lower,
        upper, cal, metrics["tolerance_months"])}
    write_json(eval_dir / "metrics.json", metrics)
    return metrics


def _row(name: str, metrics: dict[str, Any], minutes: float | None,
         epochs: int) -> dict[str, Any]:
    tta = metrics.get("tta", {})
    row = {"variant": name, "n": metrics["n"], "mae": metrics["mae"],
           "rmse": metrics["rmse"], "r2": metrics["r2"],
           "tolerance_accuracy": metrics["tolerance_accuracy"], "bias": metrics["bias"],
           "slope": metrics["regression_to_mean"]["slope"],
           "mae_without_tta": tta.get("mae_without_tta"),
           "epochs": epochs, "train_minutes": None if minutes is None else round(minutes, 1),
           # regression to the mean shows as opposite biases at the two ends
           "bias_by_age_group": {group: report.get("bias") for group, report in
                                 metrics.get("by_age_group", {}).items()}}
    if "uncertainty" in metrics:
        row["interval_coverage"] = metrics["uncertainty"]["coverage"]
    if "recalibration" in metrics:      # the run's calibration on the same images
        after, interval = metrics["recalibration"]["after"], \
            metrics["recalibration"]["interval"]
        row["calibrated"] = {
            "mae": after["mae"], "tolerance_accuracy": after["tolerance_accuracy"],
            "bias_by_age_group": after["bias_by_age_group"],
            "half_width": interval["mean_width"] / 2,   # months, on these images
            "coverage": interval["coverage"],
            "coverage_by_age_group": {g: r.get("coverage") for g, r in
                                      interval["by_age_group"].items()}}
    return row


def run_benchmark(variants: list[str] | None, overrides: list[str], out_dir: str | Path,
                  tta: int = 1, mc_samples: int = 0, resamples: int = 1000,
                  verbose: Any = 2) -> dict[str, Any]:
    """Train (or reuse) every variant, evaluate all on the same held-out split, compare
    each with the first; writes benchmark.json and report.html into ``out_dir``.

    The held-out split is a selection split of ``SELECTION_IMAGES`` images (stratified
    by age and sex, the same for every recipe and seed; ``data.selection_size`` in
    ``overrides`` changes it, 0 scores on the test split, else on validation), so that
    a test split stays untouched by the comparison."""
    out_dir = check_output_dir(out_dir, "--out")
    overrides = [f"data.selection_size={SELECTION_IMAGES}", *overrides]
    parsed = [parse_variant(v) for v in (variants or DEFAULT_VARIANTS)]
    names = [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError("variant names must differ: " + ", ".join(names) + " (name them "
                          "NAME=CONFIG).")
    # every config is valid, and every variant scored on the same images, before hours
    # of work
    own_split = _check_splits(names, [load_config(config, [*overrides, *extra])
                                      for _, config, extra in parsed])
    runs: list[Path] = []
    shared_split: pd.DataFrame | None = None
    rows, evaluations = [], []
    for k, (name, config, extra) in enumerate(parsed, start=1):
        run_dir = out_dir / name
        log.info("variant %d/%d '%s' (%s%s)", k, len(parsed), name, config,
                 "; " + ", ".join(extra) if extra else "")
        if (run_dir / "config.yaml").is_file():
            if not run_complete(read_state(run_dir)):
                log.info("'%s': resuming its half-trained run", name)
                resume(run_dir, verbose=verbose)
        else:
            cfg = load_config(config, [*overrides, *extra, f"train.output_dir={out_dir}",
                                       f"train.run_name={name}"])
            start = time.perf_counter()
            if own_split[k - 1]:
                log.info("'%s' changes the split (%s): it splits anew around the same "
                         "selection split", name, ", ".join(own_split[k - 1]))
            train(cfg, verbose=verbose, split=None if own_split[k - 1] else shared_split)
            log.info("'%s' trained in %.1f minutes", name, (time.perf_counter() - start) / 60)
        run_split = pd.read_csv(run_dir / "split.csv", dtype={"id": str})
        if shared_split is None:
            shared_split = run_split
        _check_held_out(name, names[0], run_split, shared_split)
        runs.append(run_dir)
        eval_dir = run_dir / "eval"
        if (eval_dir / "metrics.json").is_file():
            metrics = json.loads((eval_dir / "metrics.json").read_text())
        else:
            metrics = evaluate_run(run_dir, "auto", out_dir=eval_dir, tta=tta,
                                   mc_samples=mc_samples).metrics
            if "calibration" in set(run_split["split"]):
                metrics = _with_calibration(run_dir, eval_dir, metrics, tta, mc_samples)
        history = pd.read_csv(run_dir / "history.csv")
        rows.append(_row(name, metrics, _minutes(run_dir), len(history)))
        evaluations.append(eval_dir)
    comparisons = []
    for name, eval_dir in zip(names[1:], evaluations[1:]):
        result = compare_predictions(evaluations[0], eval_dir, resamples, seed=0)
        comparisons.append({"a": names[0], "b": name, **result["overall"],
                            "by_age_group": result["by_age_group"]})
    split = shared_split["split"] if shared_split is not None else pd.Series(dtype=str)
    held_out = held_out_split(split)
    train_ages = shared_split.loc[split == "train", "boneage"]
    held = shared_split.loc[split == held_out, "boneage"].to_numpy()
    summary = {"variants": [{"name": n, "config": c, "overrides": e} for n, c, e in parsed],
               "shared_overrides": overrides, "held_out_split": held_out,
               "held_out_note": SPLIT_NOTES[held_out],
               "n_held_out": len(held),
               "mean_baseline_mae": float(np.mean(np.abs(held - train_ages.mean()))),
               "tta_views": tta, "mc_samples": mc_samples, "rows": rows,
               "comparisons": comparisons}
    write_json(out_dir / "benchmark.json", summary)
    _report(out_dir, summary, runs)
    return summary


def _check_splits(names: list[str], configs: list[Any]) -> list[list[str]]:
    """For each variant, the ``data.*`` split keys it sets apart from the first variant
    (empty: it trains on the first's split); a ConfigError where a variant would be
    scored on other images than the first."""
    first = configs[0].data
    own: list[list[str]] = [[]]
    for name, cfg in zip(names[1:], configs[1:]):
        for key in HELD_OUT_KEYS:
            if getattr(cfg.data, key) != getattr(first, key):
                raise ConfigError(
                    f"variant '{name}': data.{key} is {getattr(cfg.data, key)!r}, the first "
                    f"variant '{names[0]}' has {getattr(first, key)!r}; every variant is "
                    "scored on the same held-out images: set it for all with --set.")
        changed = [f"data.{key}" for key in SPLIT_KEYS
                   if getattr(cfg.data, key) != getattr(first, key)]
        if changed and not first.selection_size:
            raise ConfigError(
                f"variant '{name}' changes {', '.join(changed)}: without a selection split "
                "(data.selection_size=0) every variant trains on the first's split so all "
                "are scored on its test or validation images; keep a selection split or "
                "set these for all with --set.")
        own.append(changed)
    return own


def _check_held_out(name: str, first: str, split: pd.DataFrame,
                    shared: pd.DataFrame) -> None:
    """A run's held-out images must be the first variant's (a run folder reused from an
    older command may hold another split)."""
    held_out = held_out_split(shared["split"])
    ids = set(split.loc[split["split"] == held_out, "id"])
    if ids != set(shared.loc[shared["split"] == held_out, "id"]):
        raise ConfigError(f"variant '{name}': its run's {held_out} split (split.csv) holds "
                          f"other images than the first variant's ('{first}'); name the "
                          "variant anew or use another --out folder.")


def _report(out_dir: Path, summary: dict[str, Any], runs: list[Path]) -> Path:
    from .plots import plot_learning_curves
    from .report import write_benchmark_report

    figure = plot_learning_curves({run.name: run / "history.csv" for run in runs},
                                  out_dir / "learning_curves.png")
    return write_benchmark_report(out_dir, summary, [figure])
