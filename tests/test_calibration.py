"""Regression to the mean and intervals that mean what they say: fitted on the
run's calibration split when training ends (or by evaluate --recalibrate), scored on
the test split, carried by predict and export."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import cli_here

from boneage_keras.calibration import (
    CalibrationError,
    apply_calibration,
    describe_interval,
    fit_calibration,
)
from boneage_keras.data import AGE_GROUPS, assign_age_group


def _shrunk(rng, n, noise_scale=None):
    truth = rng.uniform(0, 228, n)
    std = rng.uniform(4, 20, n) if noise_scale else np.full(n, 10.0)
    predicted = 120 + 0.7 * (truth - 120) + rng.normal(0, std)
    return truth, predicted, std


@pytest.mark.parametrize("scaled", [False, True])
def test_conformal_intervals_cover_new_images(scaled):
    rng = np.random.default_rng(0)
    truth, predicted, std = _shrunk(rng, 1000, noise_scale=scaled)
    cal = fit_calibration(truth, predicted, std if scaled else None)
    assert cal["interval"] == ("scaled" if scaled else "absolute")
    assert cal["slope"] == pytest.approx(1 / 0.7, rel=0.1)      # undoes the shrinkage
    new_truth, new_predicted, new_std = _shrunk(rng, 20000, noise_scale=scaled)
    corrected, lower, upper = apply_calibration(cal, new_predicted,
                                                new_std if scaled else None)
    inside = (new_truth >= lower) & (new_truth <= upper)
    assert inside.mean() == pytest.approx(0.9, abs=0.03)
    # the correction removes the bias at both ends of the age range
    young, old = new_truth < 40, new_truth > 190
    assert abs(np.mean(corrected[young] - new_truth[young])) < 5 < \
        np.mean(new_predicted[young] - new_truth[young])
    assert abs(np.mean(corrected[old] - new_truth[old])) < 5 < \
        -np.mean(new_predicted[old] - new_truth[old])
    if scaled:          # harder images get wider intervals
        assert np.corrcoef(upper - lower, new_std)[0, 1] > 0.99
    with pytest.raises(CalibrationError, match="at least 20 images"):
        fit_calibration(truth[:5], predicted[:5])


def _uneven(rng, n):
    """Errors that grow with age and, for the oldest, lean low."""
    truth = rng.uniform(0, 228, n)
    noise = np.where(truth <= 60, 4.0, np.where(truth <= 180, 12.0, 20.0))
    predicted = truth + rng.normal(0, noise) - np.where(truth > 180, 8.0, 0.0)
    return truth, predicted


def test_intervals_by_age_cover_every_age_group():
    """With age_groups, each group of corrected ages gets its own conformal offsets:
    about 90% of every true-age group covered, where one width for all over-covers
    the youngest (small errors) and under-covers the oldest (large errors)."""
    rng = np.random.default_rng(1)
    truth, predicted = _uneven(rng, 3000)
    pooled = fit_calibration(truth, predicted)
    grouped = fit_calibration(truth, predicted, age_groups=AGE_GROUPS)
    assert grouped["interval"] == "by_age" and pooled["interval"] == "absolute"
    assert [g["ages"] for g in grouped["groups"]] == ["0-60", "61-120", "121-180",
                                                      "181-240"]
    assert sum(g["n"] for g in grouped["groups"]) == 3000
    assert not any(g["pooled"] for g in grouped["groups"])
    young, old = grouped["groups"][0], grouped["groups"][-1]
    assert young["upper"] - young["lower"] < 0.6 * (old["upper"] - old["lower"])
    new_truth, new_predicted = _uneven(rng, 30000)
    groups = assign_age_group(new_truth)
    cover = {}
    for cal in (pooled, grouped):
        _, lower, upper = apply_calibration(cal, new_predicted)
        inside = (new_truth >= lower) & (new_truth <= upper)
        assert inside.mean() == pytest.approx(0.9, abs=0.02)
        cover[cal["interval"]] = [inside[groups == g].mean() for g in ("0-60", "181-240")]
    assert cover["absolute"][0] > 0.98 and cover["absolute"][1] < 0.75
    # grouped by the corrected age, not the (unknown) true one: closer to 90%, not at it
    assert 0.86 <= cover["by_age"][0] <= 0.95 and 0.8 <= cover["by_age"][1] <= 0.94
    assert describe_interval(grouped).startswith("90% interval by corrected age: 0-60 -")
    assert describe_interval(pooled) == f"90% interval +-{pooled['half_width']:.1f} months"


def test_a_group_too_small_for_its_own_interval_takes_all_images_offsets():
    rng = np.random.default_rng(2)
    truth, predicted = _uneven(rng, 400)
    keep = (truth > 60) | (np.arange(400) < 10)     # 10 young images left at most
    cal = fit_calibration(truth[keep], predicted[keep], age_groups=AGE_GROUPS)
    young = cal["groups"][0]
    assert young["n"] < 20 and young["pooled"]
    everyone = np.sort(truth[keep] - apply_calibration(cal, predicted[keep])[0])
    assert everyone[0] <= young["lower"] < young["upper"] <= everyone[-1]
    # the offsets of all the images: one group spanning every age has them
    (whole,) = fit_calibration(truth[keep], predicted[keep],
                               age_groups=((0, 240),))["groups"]
    assert (young["lower"], young["upper"]) == pytest.approx((whole["lower"],
                                                              whole["upper"]))
    assert not cal["groups"][2]["pooled"]
    assert (young["lower"], young["upper"]) != (cal["groups"][2]["lower"],
                                                cal["groups"][2]["upper"])
    # a std (MC dropout, an ensemble) keeps the scaled interval
    assert fit_calibration(truth, predicted, np.full(400, 10.0),
                           age_groups=AGE_GROUPS)["interval"] == "scaled"


def _stored_interval(cal, corrected):
    """Each corrected age's interval, looked up by hand in calibration.json's groups."""
    rows = []
    for value in corrected:
        group = next((g for g in cal["groups"] if value <= g["upto"]), cal["groups"][-1])
        rows.append((value + group["lower"], value + group["upper"]))
    return np.array(rows)


def test_evaluate_recalibrates_on_the_calibration_split_and_scores_on_test(
        trained_run, tmp_path, bulk_dir):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png",
                                                                   "report.html"))
    proc = cli_here(["evaluate", run, "--recalibrate", "--out", tmp_path / "eval"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    split = pd.read_csv(run / "split.csv")
    recal = metrics["recalibration"]
    # fitted on the calibration split (neither trained on nor chose the checkpoint) ...
    assert recal["fit"]["n"] == (split["split"] == "calibration").sum() > 0
    assert metrics["n"] == (split["split"] == "test").sum()         # ... scored on test
    before = recal["before"]["regression_to_mean"]["slope"]
    after = recal["after"]["regression_to_mean"]["slope"]
    assert before < 0.9 and abs(1 - after) < abs(1 - before)      # less pull to the mean
    assert 0.82 <= recal["interval"]["coverage"] <= 0.97
    assert metrics["regression_to_mean"]["slope"] == pytest.approx(after)
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"id": str})
    assert {"predicted_uncorrected", "lower90", "upper90"} <= set(preds.columns)
    assert "recalibrated (fitted on the calibration split)" in proc.stdout
    assert "Recalibration (fitted on the calibration split)" in \
        (tmp_path / "eval" / "report.html").read_text()
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["slope"] == pytest.approx(recal["fit"]["slope"])
    # predict applies the stored calibration: the same corrected months
    images = [str(bulk_dir / "images" / f"{i}.png") for i in preds["id"].head(5)]
    out = cli_here(["predict", "--model", run, "--recalibrate", *images]).stdout
    table = pd.read_csv(io.StringIO(out))
    np.testing.assert_allclose(table["predicted"], preds["predicted"].head(5), atol=0.02)
    assert saved["interval"] == "by_age"
    np.testing.assert_allclose(table[["lower90", "upper90"]],
                               _stored_interval(saved, table["predicted"]), atol=0.01)
    # fitted without TTA: predicting with TTA and this calibration is refused
    proc = cli_here(["predict", "--model", run, "--recalibrate", "--tta", "2", *images],
                    check=False)
    assert proc.returncode == 2 and "--tta 1" in proc.stderr
    # and the export carries it for deployment
    cli_here(["export", run, "--format", "keras", "--format", "onnx", "--out",
              tmp_path / "deploy"])
    meta = json.loads((tmp_path / "deploy" / "model.json").read_text())
    assert meta["calibration"]["slope"] == pytest.approx(saved["slope"])
    out = cli_here(["predict", "--model", tmp_path / "deploy" / "model.onnx",
                    "--recalibrate", *images]).stdout
    np.testing.assert_allclose(pd.read_csv(io.StringIO(out))["predicted"],
                               table["predicted"], atol=0.02)


def test_recalibration_needs_a_held_out_split_and_a_fit(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png"))
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    split.loc[split["split"] == "test", "split"] = "train"
    split.to_csv(run / "split.csv", index=False)
    proc = cli_here(["evaluate", run, "--recalibrate"], check=False)
    assert proc.returncode == 2 and "has neither" in proc.stderr
    proc = cli_here(["predict", "--model", run, "--recalibrate", "x.png"], check=False)
    assert proc.returncode == 2 and "no calibration stored" in proc.stderr


def test_training_ends_with_the_runs_calibration(trained_run, tmp_path, bulk_dir):
    """`boneage train` fits the run's correction and 90% interval on its calibration
    split when it ends (here: one more epoch of a resumed run), for predict."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png",
                                                                   "calibration.json"))
    proc = cli_here(["train", "--resume", run, "--set", "train.epochs=7"])
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    n = int((split["split"] == "calibration").sum())
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["fitted_on"] == "calibration split" and saved["n"] == n
    assert saved["interval"] == "by_age" and "half_width" not in saved
    assert all(g["lower"] < g["upper"] for g in saved["groups"])
    assert saved["tta"] == 1 and saved["mc_samples"] == 0
    assert f"calibration (calibration split, {n} images)" in proc.stdout
    image = str(bulk_dir / "images" / f"{split.loc[split['split'] == 'test', 'id'].iloc[0]}.png")
    out = pd.read_csv(io.StringIO(cli_here(["predict", "--model", run, "--recalibrate",
                                            image]).stdout))
    np.testing.assert_allclose(out[["lower90", "upper90"]],
                               _stored_interval(saved, out["predicted"]), atol=0.01)


def test_a_run_that_keeps_its_last_epoch_calibrates_on_validation_too():
    """Validation chooses the checkpoint (and stops early) unless the run keeps its
    last epoch: only then may its images join the calibration split's."""
    from boneage_keras.evaluate import calibration_splits, fitted_on

    both = pd.Series(["train", "val", "calibration", "selection"])
    assert calibration_splits(both, "last") == ("calibration", "val")
    assert calibration_splits(both, "val_tolerance_accuracy") == ("calibration",)
    assert calibration_splits(pd.Series(["train", "val", "test"]), "last") == ("val",)
    assert fitted_on(("calibration", "val")) == "calibration and validation splits"


def test_a_last_epoch_run_is_calibrated_on_both_held_out_splits(trained_run, tmp_path):
    """The trained run, as if it had kept its last epoch: calibration.json is fitted on
    its calibration and validation images, and scored on its test split."""
    import yaml

    from boneage_keras.evaluate import calibrate_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png",
                                                                   "calibration.json"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"].update(monitor="last", early_stopping_patience=None)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    split = pd.read_csv(run / "split.csv", dtype={"id": str})["split"]
    n_cal, n_val = int((split == "calibration").sum()), int((split == "val").sum())
    assert n_cal >= 20 and n_val >= 20
    saved = calibrate_run(run)
    assert saved["fitted_on"] == "calibration and validation splits"
    assert saved["n"] == n_cal + n_val
    assert json.loads((run / "calibration.json").read_text())["n"] == n_cal + n_val
    proc = cli_here(["evaluate", run, "--recalibrate", "--out", tmp_path / "eval"])
    assert "fitted on the calibration and validation splits" in proc.stdout + proc.stderr
