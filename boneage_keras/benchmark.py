"""The learning benchmark: train a config without and with the sex input, evaluate both
(and their two-model ensemble) on the shared validation split with and without TTA, and
report the figures side by side.

    >>> result = learning_benchmark("configs/cpu-bench.yaml", ["data.data_dir=DIR"], "bench")
    >>> result["rows"]     # one dict per variant: val MAE with/without TTA, +-12 accuracy

Both variants use the same config, seed and therefore the same split, so the ensemble's
validation images were held out by both. An interrupted benchmark is continued by
running the same command again: finished variants are reused, a half-trained one resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import load_config
from .evaluate import evaluate_run
from .files import write_json
from .train import read_state, resume, train

VARIANTS = (("image", False), ("image+sex", True))


def _trained(run_dir: Path) -> bool:
    state = read_state(run_dir)
    return state is not None and (state["finished"] or state["stopped_early"])


def _train_variant(config_path: str | Path, overrides: list[str], out_dir: Path,
                   name: str, use_sex: bool, verbose: Any) -> tuple[Path, float | None]:
    run_dir = out_dir / name
    if _trained(run_dir):
        return run_dir, None
    start = time.perf_counter()
    if (run_dir / "config.yaml").is_file():
        resume(run_dir, verbose=verbose)
    else:
        cfg = load_config(config_path, [*overrides, f"model.use_sex={str(use_sex).lower()}",
                                        f"train.output_dir={out_dir}",
                                        f"train.run_name={name}"])
        train(cfg, verbose=verbose)
    return run_dir, time.perf_counter() - start


def _row(name: str, metrics: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    tta = metrics.get("tta", {})
    row = {"variant": name, "n_val": metrics["n"],
           "val_mae": tta.get("mae_without_tta", metrics["mae"]),
           "val_mae_tta": tta.get("mae", metrics["mae"]),
           "tolerance_accuracy_tta": metrics["tolerance_accuracy"],
           "train_seconds": None if seconds is None else round(seconds, 1)}
    if "uncertainty" in metrics:
        u = metrics["uncertainty"]
        row.update(interval_coverage=u["coverage"], interval_width=u["mean_width"],
                   interval_verdict=u["verdict"])
    return row


def learning_benchmark(config_path: str | Path, overrides: list[str], out_dir: str | Path,
                       tta: int = 4, mc_samples: int = 0, verbose: Any = 2) -> dict[str, Any]:
    """Train both variants (or reuse them), evaluate on validation, write benchmark.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for name, use_sex in VARIANTS:
        run_dir, seconds = _train_variant(config_path, overrides, out_dir, name, use_sex,
                                          verbose)
        runs.append(run_dir)
        result = evaluate_run(run_dir, "val", out_dir=run_dir / "eval-val", tta=tta,
                              mc_samples=mc_samples)
        rows.append(_row(name, result.metrics, seconds))
    ensemble = evaluate_run(runs, "val", out_dir=out_dir / "eval-ensemble", tta=tta,
                            mc_samples=mc_samples)
    rows.append(_row("ensemble of both", ensemble.metrics, None))
    cfg = load_config(runs[0] / "config.yaml")
    split = pd.read_csv(runs[0] / "split.csv")
    train_mean = split.loc[split["split"] == "train", "boneage"].mean()
    val = split.loc[split["split"] == "val", "boneage"].to_numpy()
    summary = {"mean_baseline_mae": float(np.mean(np.abs(val - train_mean))),"config": str(config_path), "overrides": overrides, "tta_views": tta,
               "mc_samples": mc_samples, "backbone": cfg.model.backbone,
               "image_size": cfg.data.image_size, "epochs": cfg.train.epochs,
               "max_images": cfg.data.max_images, "rows": rows}
    write_json(out_dir / "benchmark.json", summary)
    return summary
