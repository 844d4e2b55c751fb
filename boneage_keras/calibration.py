"""Predictions that mean what they say, fitted on a split of the run that neither
trained the model nor chose its checkpoint (its calibration split, with its
validation split where the run keeps its last epoch; the validation split where a run
has no calibration split, with slightly optimistic residuals if it chose the
checkpoint).

* **Regression to the mean.** A model trained briefly pulls every age toward the
  training mean (young children too old, teenagers too young). On that split,
  predicted = a + b * true is fitted (b < 1: the pull); the correction
  ``corrected = (predicted - a) / b`` makes the expected correction zero at every
  true age (the bias-correction used for brain age, Smith et al. 2019). It removes the
  age-dependent bias, at the price of stretching the noise by 1/b: MAE can go up for a
  weak model, and both are reported.
* **Intervals.** Split-conformal: on that split, the ``level`` quantile (with
  the finite-sample correction) of |true - corrected| (``absolute``: one width for all
  images) or of |true - corrected| / std (``scaled``: wider where the model is less
  sure, from MC dropout or an ensemble's spread) gives the half-width that covers
  ``level`` of new images from the same population. Given ``age_groups`` and no std,
  the interval is fitted per group of the corrected age (``by_age``, Mondrian
  conformal, Vovk et al. 2003): in each group the lower and upper (1 - level) / 2
  quantiles of true - corrected, so each group of predicted ages gets its own width
  and its own asymmetry (at both ends, where the linear correction stretches noise
  along with the pull it removes, the interval leans back toward the middle ages); a
  group with fewer than ``MIN_GROUP_IMAGES`` images uses the offsets of all the
  images.

    >>> cal = fit_calibration(cal_truth, cal_predicted, cal_std, level=0.9)
    >>> corrected, lower, upper = apply_calibration(cal, test_predicted, test_std)

It is fitted at the end of ``boneage train`` on the run's calibration split
(``data.calibration_fraction``; with the validation split under ``train.monitor:
last``), or by ``boneage evaluate RUN --recalibrate``, stored
in the run (``calibration.json``) and in an export's model.json, and applied by
evaluate, predict and the exported model's users; it is never scored on the images it
was fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import BoneAgeError

MIN_IMAGES = 20
MIN_GROUP_IMAGES = 20  # the fewest for a finite 95% quantile: (n + 1) * 0.95 <= n


class CalibrationError(BoneAgeError, ValueError):
    """A calibration cannot be fitted or applied; the message says why."""


def _quantile(values: np.ndarray, level: float) -> float:
    """The split-conformal quantile: the ceil((n + 1) * level)-th smallest value."""
    rank = min(len(values), math.ceil((len(values) + 1) * level))
    return float(np.sort(values)[rank - 1])


def _signed_offsets(residual: np.ndarray, level: float) -> tuple[float, float]:
    """The lower and upper offsets that each leave (1 - level) / 2 of the signed
    residuals (true - corrected) outside."""
    tail = 1.0 - (1.0 - level) / 2.0
    return -_quantile(-residual, tail), _quantile(residual, tail)


def _group_index(uppers: list[float], corrected: np.ndarray) -> np.ndarray:
    """Each corrected age's group: the first whose upper bound it does not pass
    (below the first: the first; beyond the last: the last)."""
    return np.minimum(np.searchsorted(np.asarray(uppers, np.float64), corrected,
                                      side="left"), len(uppers) - 1)


def fit_calibration(truth: np.ndarray, predicted: np.ndarray,
                    std: np.ndarray | None = None, level: float = 0.9,
                    fitted_on: str = "validation split",
                    age_groups: Sequence[tuple[int, int]] | None = None
                    ) -> dict[str, Any]:
    """The linear recalibration and the conformal interval, fitted on one split;
    ``age_groups`` ((low, high) months, in order) fits the interval per group of the
    corrected age where no ``std`` is given."""
    truth = np.asarray(truth, np.float64).reshape(-1)
    predicted = np.asarray(predicted, np.float64).reshape(-1)
    n = len(truth)
    if n < MIN_IMAGES:
        raise CalibrationError(f"calibration needs at least {MIN_IMAGES} images of the "
                               f"{fitted_on}, got {n}; use a larger data.val_fraction.")
    b, a = np.polyfit(truth, predicted, 1) if np.ptp(truth) > 0 else (0.0, 0.0)
    if b < 0.1:
        raise CalibrationError(f"the predictions barely follow the true age on the "
                               f"{fitted_on} (slope of predicted on true {b:.3f}): a "
                               "correction would only amplify noise; train longer first.")
    slope, intercept = 1.0 / b, -a / b
    corrected = intercept + slope * predicted
    residual = np.abs(truth - corrected)
    kind = "absolute"
    if std is not None:
        std = np.maximum(np.asarray(std, np.float64).reshape(-1), 1e-6)
        residual = residual / std
        kind = "scaled"
    cal = {"slope": float(slope), "intercept": float(intercept),
           "pull": {"slope": float(b), "intercept": float(a)}, "level": level,
           "interval": kind, "fitted_on": fitted_on, "n": n}
    if std is None and age_groups:      # the groups' offsets are the interval
        cal.update(interval="by_age",
                   groups=_group_offsets(truth - corrected, corrected, age_groups, level))
    else:
        cal["half_width"] = _quantile(residual, level)
    return cal


def _group_offsets(signed: np.ndarray, corrected: np.ndarray,
                   age_groups: Sequence[tuple[int, int]], level: float
                   ) -> list[dict[str, Any]]:
    """Each age group's offsets, from the residuals of the images whose corrected age
    falls in it (too few: those of all the images)."""
    pooled = _signed_offsets(signed, level)
    which = _group_index([high for _, high in age_groups], corrected)
    groups = []
    for i, (low, high) in enumerate(age_groups):
        members = signed[which == i]
        enough = len(members) >= MIN_GROUP_IMAGES
        lower, upper = _signed_offsets(members, level) if enough else pooled
        groups.append({"ages": f"{low}-{high}", "upto": high, "n": len(members),
                       "lower": lower, "upper": upper, "pooled": not enough})
    return groups


def describe_interval(cal: dict[str, Any]) -> str:
    """The interval of a calibration in words, e.g. ``90% interval +-22.6 months``."""
    head = f"{cal['level']:.0%} interval"
    if cal["interval"] == "scaled":
        return f"{head} +-{cal['half_width']:.2f} x std"
    if cal["interval"] == "by_age":
        return f"{head} by corrected age: " + ", ".join(
            f"{g['ages']} {g['lower']:+.1f}/{g['upper']:+.1f}" for g in cal["groups"]) \
            + " months"
    return f"{head} +-{cal['half_width']:.1f} months"


def apply_calibration(cal: dict[str, Any], predicted: np.ndarray,
                      std: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corrected months and the interval's lower and upper ends."""
    predicted = np.asarray(predicted, np.float64)
    corrected = cal["intercept"] + cal["slope"] * predicted
    if cal["interval"] == "scaled":
        if std is None:
            raise CalibrationError("this calibration scales its intervals by each image's "
                                   "std: predict with the same --mc-samples (or ensemble) "
                                   "it was fitted with.")
        half = cal["half_width"] * np.maximum(np.asarray(std, np.float64), 1e-6)
    elif cal["interval"] == "by_age":
        groups = cal["groups"]
        which = _group_index([g["upto"] for g in groups], corrected)
        lower = np.array([g["lower"] for g in groups], np.float64)[which]
        upper = np.array([g["upper"] for g in groups], np.float64)[which]
        return corrected, corrected + lower, corrected + upper
    else:
        half = np.full_like(corrected, cal["half_width"])
    return corrected, corrected - half, corrected + half

