"""`cli.py benchmark`, the experiment runner, end to end on real images (tiny runs):
variants on one split, one table, paired bootstrap against the first, learning curves;
rerun or extended, it continues where it stopped."""

import json
import shutil

import pandas as pd
import pytest
from conftest import cli_here

SHARED = ["--set", "data.max_images=240", "--set", "data.image_size=32",
          "--set", "data.resize=stretch", "--set", "data.test_fraction=0.25",
          "--set", "data.selection_size=300",
          "--set", "model.backbone=resnet18", "--set", "model.width=0.25",
          "--set", "model.weights=none",
          "--set", "train.epochs=2", "--set", "train.batch_size=32",
          "--set", "train.learning_rate=0.003", "--set", "augment.rotation_degrees=0",
          "--set", "augment.translation=0", "--set", "augment.scale=null",
          "--set", "augment.brightness=0", "--set", "augment.contrast=null"]


def test_benchmark_compares_variants_on_one_split(tmp_path, bulk_dir):
    out = tmp_path / "bench"
    base = ["benchmark", "--data-dir", bulk_dir, *SHARED, "--out", out, "--resamples", "200"]
    # interrupted after the first variant: only it exists
    cli_here([*base, "plain=default"])
    first = (out / "plain" / "best.keras").stat().st_mtime_ns
    sex = "sex=default,model.use_sex=true,train.seed=7"
    own = "own=default,data.split=stratified,data.val_fraction=0.3"
    proc = cli_here([*base, "plain=default", sex, own])
    # the finished variant was reused, not retrained
    assert (out / "plain" / "best.keras").stat().st_mtime_ns == first
    assert "variant 1/3 'plain'" in proc.stderr and "'plain' trained in" not in proc.stderr
    # another seed trains on the first variant's split; another split is honoured,
    # around the same selection split
    splits = [pd.read_csv(out / name / "split.csv", dtype={"id": str})
              for name in ("plain", "sex", "own")]
    counts = splits[0]["split"].value_counts()
    assert splits[0].equals(splits[1]) and (counts["test"], counts["selection"]) == (60, 300)
    own_counts = splits[2]["split"].value_counts()
    assert (own_counts["val"], counts["val"]) == (72, 24)
    assert "'own' changes the split (data.split, data.val_fraction)" in proc.stderr
    selected = [set(s.loc[s["split"] == "selection", "id"]) for s in splits]
    assert selected[0] == selected[2]
    # scored on the selection split; the test split stays untouched
    result = json.loads((out / "benchmark.json").read_text())
    assert result["held_out_split"] == "selection" and result["n_held_out"] == 300
    rows = {r["variant"]: r for r in result["rows"]}
    for name in ("plain", "sex", "own"):
        preds = pd.read_csv(out / name / "eval" / "predictions.csv", dtype={"id": str})
        assert set(preds["id"]) == set(splits[0].loc[splits[0]["split"] == "selection",
                                                     "id"])
        assert rows[name]["mae"] == pytest.approx(
            (preds["predicted"] - preds["boneage"]).abs().mean(), abs=1e-6)
        assert rows[name]["epochs"] == 2 and rows[name]["train_minutes"] > 0
        young = preds["boneage"] <= 60
        assert rows[name]["bias_by_age_group"]["0-60"] == pytest.approx(
            (preds["predicted"] - preds["boneage"])[young].mean(), abs=1e-6)
    comparison = result["comparisons"][0]
    assert (comparison["a"], comparison["b"], comparison["n"]) == ("plain", "sex", 300)
    assert (result["comparisons"][1]["b"], result["comparisons"][1]["n"]) == ("own", 300)
    assert comparison["difference"] == pytest.approx(rows["sex"]["mae"] - rows["plain"]["mae"])
    assert comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"]
    assert "sex - plain: MAE" in proc.stdout and "held out: selection split, n=300" in proc.stdout
    page = (out / "report.html").read_text()
    assert "Paired bootstrap" in page and page.count("data:image/png;base64,") == 1
    assert "Bias by age group" in page and "bias by age group" in proc.stdout
    # a third call trains nothing
    again = cli_here([*base, "plain=default", "sex=default,model.use_sex=true"])
    assert "trained in" not in again.stderr
    # a reused run folder whose selection split holds other images is refused
    changed = splits[2].copy()
    changed.loc[changed.index[changed["split"] == "selection"][0], "split"] = "train"
    changed.to_csv(out / "own" / "split.csv", index=False)
    proc = cli_here([*base, "plain=default", own], check=False)
    assert proc.returncode == 2 and "variant 'own': its run's selection split" in proc.stderr


def test_bad_variants_are_clear(tmp_path):
    proc = cli_here(["benchmark", "x=default,train.epochz=2", "--out", tmp_path], check=False)
    assert proc.returncode == 2 and "unknown key 'train.epochz'" in proc.stderr
    proc = cli_here(["benchmark", "a=default", "a=cpu-bench", "--out", tmp_path], check=False)
    assert proc.returncode == 2 and "variant names must differ" in proc.stderr
    # refused before anything trains: other held-out images, or another split where
    # the first's test split scores every variant
    proc = cli_here(["benchmark", "a=default", "b=default,data.age_range=[0,200]", "--out",
                     tmp_path], check=False)
    assert proc.returncode == 2 and "variant 'b': data.age_range is [0.0, 200.0]" in \
        proc.stderr and "set it for all with --set" in proc.stderr
    proc = cli_here(["benchmark", "a=default", "b=default,data.val_fraction=0.3", "--set",
                     "data.selection_size=0", "--out", tmp_path], check=False)
    assert proc.returncode == 2 and "variant 'b' changes data.val_fraction: without a " \
        "selection split" in proc.stderr
    assert not (tmp_path / "a").exists() and "Traceback" not in proc.stderr


def test_each_variant_is_scored_with_its_own_calibration(trained_run, tmp_path):
    """A run with a calibration split: the runner fits its correction and interval
    there and scores them on the held-out images beside the model's own figures."""
    from boneage_keras.benchmark import _row, _with_calibration
    from boneage_keras.evaluate import evaluate_run
    from boneage_keras.summaries import benchmark_summary

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png",
                                                                   "calibration.json"))
    metrics = evaluate_run(run, "auto", out_dir=run / "eval").metrics
    scored = _with_calibration(run, run / "eval", metrics, 1, 0)
    row = _row("small", scored, 1.0, 6)
    assert row["mae"] == metrics["mae"]               # the model's own figures stay
    calibrated = row["calibrated"]
    assert 0.75 <= calibrated["coverage"] <= 1.0 and calibrated["half_width"] > 0
    assert set(calibrated["coverage_by_age_group"]) == set(row["bias_by_age_group"])
    assert json.loads((run / "calibration.json").read_text())["fitted_on"] == \
        "calibration split"
    # the reused metrics.json carries it, and the printed table shows it
    assert "recalibration" in json.loads((run / "eval" / "metrics.json").read_text())
    text = benchmark_summary({"held_out_split": "test", "held_out_note": "", "n_held_out":
                              metrics["n"], "mean_baseline_mae": 40.0, "rows": [row],
                              "comparisons": []}, tmp_path)
    assert "each run's calibration" in text and f"{calibrated['coverage']:.3f}" in text
