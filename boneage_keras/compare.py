"""Is model B better than model A? A paired bootstrap over the images both predicted.

    >>> compare_predictions("runs/a", "runs/b")["overall"]   # MAE(B) - MAE(A), 95% CI

A and B are evaluated run directories (their predictions.csv) or predictions.csv files,
e.g. of an ensemble; ids present in only one are listed, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import AGE_GROUPS, DataError, age_group_label, assign_age_group
from .files import check_output_file, write_json
from .metrics import paired_bootstrap_mae


def _read_predictions(source: str | Path) -> tuple[pd.DataFrame, str]:
    path = Path(source)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise DataError(f"no predictions at {path}: run `boneage evaluate` on that run first, "
                        "or pass a predictions.csv.")
    table = pd.read_csv(path, dtype={"id": str})
    missing = [c for c in ("id", "boneage", "predicted") if c not in table]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected a "
                        "predictions.csv written by `boneage evaluate`.")
    return table, str(path)


def compare_predictions(a: str | Path, b: str | Path, n_resamples: int = 1000,
                        seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Paired bootstrap of MAE(B) - MAE(A) on the ids both predicted, overall and per
    age group; ids present in only one file are listed, not silently dropped. ``out``:
    also write the result there as JSON."""
    if out is not None:
        check_output_file(out, "--out")
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
    if out is not None:
        write_json(out, result)
    return result
