import keras
import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from boneage_keras.metrics import (
    ToleranceAccuracy,
    regression_report,
    report_by_age_group,
)


def test_tolerance_accuracy_matches_numpy():
    rng = np.random.default_rng(0)
    y_true = rng.uniform(0, 230, 500).astype("float32")
    y_pred = (y_true + rng.normal(0, 15, 500)).astype("float32")
    metric = ToleranceAccuracy(12)
    for chunk in np.array_split(np.arange(500), 7):     # accumulates over batches
        metric.update_state(y_true[chunk, None], y_pred[chunk, None])
    expected = np.mean(np.abs(y_pred - y_true) <= 12)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    metric.update_state(np.array([0.0, 10.0]), np.array([12.0, 30.0]))   # edge: |e| == tol
    assert float(metric.result()) == pytest.approx(0.5)


def test_tolerance_accuracy_round_trips_config():
    metric = keras.metrics.deserialize(keras.metrics.serialize(ToleranceAccuracy(6.0)))
    assert isinstance(metric, ToleranceAccuracy) and metric.tolerance_months == 6.0


def test_report_matches_sklearn():
    rng = np.random.default_rng(1)
    y_true = rng.uniform(0, 230, 300)
    y_pred = y_true + rng.normal(2, 10, 300)
    report = regression_report(y_true, y_pred, 12)
    assert report["mae"] == pytest.approx(mean_absolute_error(y_true, y_pred), abs=1e-6)
    assert report["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y_true, y_pred)),
                                           abs=1e-6)
    assert report["r2"] == pytest.approx(r2_score(y_true, y_pred), abs=1e-6)
    assert report["bias"] == pytest.approx(np.mean(y_pred - y_true), abs=1e-6)
    groups = report_by_age_group(y_true, y_pred, 12)
    assert sum(g["n"] for g in groups.values()) == 300
    mask = y_true <= 60
    assert groups["0-60"]["mae"] == pytest.approx(
        mean_absolute_error(y_true[mask], y_pred[mask]), abs=1e-6)
