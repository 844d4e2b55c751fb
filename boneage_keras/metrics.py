"""Bone-age metrics: a Keras ``ToleranceAccuracy`` metric and numpy reports.

    >>> model.compile(..., metrics=[ToleranceAccuracy(tolerance_months=12)])
    >>> regression_report(y_true, y_pred)["mae"]
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from .data import AGE_GROUPS, age_group_label, assign_age_group


@keras.saving.register_keras_serializable(package="boneage_keras")
class ToleranceAccuracy(keras.metrics.Metric):
    """Fraction of predictions within ``tolerance_months`` of the truth (|error| <= tol)."""

    def __init__(self, tolerance_months: float = 12.0, name: str = "tolerance_accuracy",
                 dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.tolerance_months = float(tolerance_months)
        self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.reshape(ops.cast(y_true, "float32"), (-1,))
        y_pred = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
        hit = ops.cast(ops.abs(y_pred - y_true) <= self.tolerance_months, "float32")
        if sample_weight is not None:
            weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
            hit, total = hit * weight, ops.sum(weight)
        else:
            total = ops.cast(ops.shape(hit)[0], "float32")
        self.hits.assign_add(ops.sum(hit))
        self.count.assign_add(total)

    def result(self):
        return ops.divide_no_nan(self.hits, self.count)

    def reset_state(self):
        self.hits.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype,
                "tolerance_months": self.tolerance_months}


def tolerance_accuracy(y_true: np.ndarray, y_pred: np.ndarray, tolerance: float) -> float:
    return float(np.mean(np.abs(np.asarray(y_pred) - np.asarray(y_true)) <= tolerance))


def regression_report(y_true: np.ndarray, y_pred: np.ndarray,
                      tolerance_months: float = 12.0) -> dict[str, Any]:
    """MAE, RMSE, R2, bias (mean predicted - true) and tolerance accuracy, in months."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    error = y_pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2)) if len(y_true) else 0.0
    return {
        "n": len(y_true),
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error ** 2))),
        "r2": float(1 - np.sum(error ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
        "bias": float(np.mean(error)),
        "tolerance_accuracy": tolerance_accuracy(y_true, y_pred, tolerance_months),
        "tolerance_months": float(tolerance_months),
    }


def report_by_age_group(y_true: np.ndarray, y_pred: np.ndarray,
                        tolerance_months: float = 12.0) -> dict[str, dict[str, Any]]:
    """``regression_report`` for each study age group (0-60, 61-120, 121-180, 181-240)."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    groups = assign_age_group(y_true)
    out = {}
    for low, high in AGE_GROUPS:
        label = age_group_label(low, high)
        mask = groups == label
        if mask.any():
            out[label] = regression_report(y_true[mask], y_pred[mask], tolerance_months)
        else:
            out[label] = {"n": 0}
    return out


def accuracy_at(y_true: np.ndarray, y_pred: np.ndarray,
                tolerances: tuple[float, ...] = (6, 12, 24)) -> dict[str, float]:
    """Tolerance accuracy at several tolerances, keyed by months as text."""
    return {f"{t:g}": tolerance_accuracy(y_true, y_pred, t) for t in tolerances}


def regression_to_mean(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The slope and intercept of predicted on true age: 1 and 0 without regression to
    the mean; a slope below 1 pulls young ages up and old ages down."""
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    if len(y_true) < 2 or np.ptp(y_true) <= 0:
        return {"slope": float("nan"), "intercept": float("nan")}
    slope, intercept = np.polyfit(y_true, y_pred, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def coverage_report(y_true: np.ndarray, lower: np.ndarray, upper: np.ndarray
                    ) -> dict[str, Any]:
    """Fraction of true ages inside [lower, upper] and the mean width, overall and per
    study age group (groups with fewer than 10 images get n only)."""
    y_true = np.asarray(y_true, np.float64)
    inside = (y_true >= lower) & (y_true <= upper)
    out: dict[str, Any] = {"coverage": float(inside.mean()),
                           "mean_width": float(np.mean(upper - lower)), "by_age_group": {}}
    groups = assign_age_group(y_true)
    for low, high in AGE_GROUPS:
        label = age_group_label(low, high)
        mask = groups == label
        out["by_age_group"][label] = (
            {"n": int(mask.sum()), "coverage": float(inside[mask].mean()),
             "mean_width": float(np.mean((upper - lower)[mask]))}
            if mask.sum() >= 10 else {"n": int(mask.sum())})
    return out


def recalibration_report(y_true: np.ndarray, raw: np.ndarray, corrected: np.ndarray,
                         lower: np.ndarray, upper: np.ndarray, calibration: dict[str, Any],
                         tolerance_months: float = 12.0) -> dict[str, Any]:
    """What the linear correction and the conformal interval (fitted elsewhere) do on
    these images: MAE, tolerance accuracy, regression to the mean and bias per age
    group before and after, and the interval's coverage."""
    def summary(pred: np.ndarray) -> dict[str, Any]:
        report = regression_report(y_true, pred, tolerance_months)
        return {"mae": report["mae"], "tolerance_accuracy": report["tolerance_accuracy"],
                "regression_to_mean": regression_to_mean(y_true, pred),
                "bias_by_age_group": {g: r.get("bias") for g, r in report_by_age_group(
                    y_true, pred, tolerance_months).items()}}

    return {"fit": calibration, "before": summary(raw), "after": summary(corrected),
            "interval": {"level": calibration["level"], "kind": calibration["interval"],
                         **coverage_report(y_true, lower, upper)}}


def full_report(y_true: np.ndarray, y_pred: np.ndarray, male: np.ndarray,
                tolerance_months: float = 12.0) -> dict[str, Any]:
    """Everything ``evaluate`` writes to metrics.json: overall, by age group, by sex."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    male = np.asarray(male, dtype=bool)
    overall = regression_report(y_true, y_pred, tolerance_months)
    order = ("mae", "rmse", "r2", "bias", "tolerance_accuracy", "tolerance_months", "n")
    report: dict[str, Any] = {key: overall[key] for key in order}
    report["accuracy_at"] = accuracy_at(y_true, y_pred)
    report["regression_to_mean"] = regression_to_mean(y_true, y_pred)
    report["by_age_group"] = report_by_age_group(y_true, y_pred, tolerance_months)
    report["by_sex"] = {
        name: (regression_report(y_true[mask], y_pred[mask], tolerance_months)
               if mask.any() else {"n": 0})
        for name, mask in (("male", male), ("female", ~male))
    }
    return report


def paired_bootstrap_mae(abs_error_a: np.ndarray, abs_error_b: np.ndarray,
                         n_resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of MAE(B) - MAE(A) over the same cases.

    Returns the point estimate, the percentile confidence interval and the fraction
    of resamples in which B is worse than A. Negative differences mean B is better.
    """
    a = np.asarray(abs_error_a, dtype=np.float64)
    b = np.asarray(abs_error_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired bootstrap needs two equally long, non-empty error arrays")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))
    diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"n": len(a), "mae_a": float(a.mean()), "mae_b": float(b.mean()),
            "difference": float(b.mean() - a.mean()), "ci_low": float(low),
            "ci_high": float(high), "confidence": confidence,
            "n_resamples": int(n_resamples), "seed": int(seed),
            "fraction_b_worse": float(np.mean(diffs > 0))}


NOMINAL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def interval_calibration(y_true: np.ndarray, y_pred: np.ndarray, std: np.ndarray,
                         level: float = 0.9, slack: float = 0.03) -> dict[str, Any]:
    """How honest are Gaussian intervals ``pred +- z * std``?

    Coverage (fraction of true ages inside) and mean width of the ``level`` interval,
    coverage at every nominal level in ``NOMINAL_LEVELS`` (the calibration curve), the
    factor by which std would have to be scaled for exactly ``level`` coverage, and a
    verdict: over-confident (too narrow, coverage < level - slack), under-confident
    (too wide) or calibrated.
    """
    from scipy.stats import norm

    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    std = np.maximum(np.asarray(std, dtype=np.float64), 1e-9)
    z_score = np.abs(y_true - y_pred) / std

    def coverage(p: float) -> float:
        return float(np.mean(z_score <= norm.ppf(0.5 + p / 2)))

    z = norm.ppf(0.5 + level / 2)
    covered = coverage(level)
    if covered < level - slack:
        verdict = "over-confident (intervals too narrow)"
    elif covered > level + slack:
        verdict = "under-confident (intervals too wide)"
    else:
        verdict = "calibrated"
    return {"level": level, "coverage": covered, "mean_width": float(np.mean(2 * z * std)),
            "mean_std": float(np.mean(std)),
            "scale_for_nominal": float(np.quantile(z_score, level) / z),
            "error_std_correlation": float(np.corrcoef(np.abs(y_true - y_pred), std)[0, 1])
            if len(std) > 1 and np.std(std) > 0 else None,
            "verdict": verdict,
            "curve": {f"{p:g}": coverage(p) for p in NOMINAL_LEVELS}}
