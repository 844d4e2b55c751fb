"""Test-time augmentation, MC-dropout uncertainty, interval calibration and ensembles,
on the small model trained on real radiographs (and through the CLI on both backends)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import cli_here, run_cli_batch

from boneage_keras.compare import compare_predictions
from boneage_keras.config import load_config
from boneage_keras.data import DataError
from boneage_keras.evaluate import evaluate_run
from boneage_keras.inference import (
    TTA_VIEWS,
    KerasPredictor,
    ModelFileError,
    open_model,
    predict_images,
    tta_views,
)
from boneage_keras.metrics import interval_calibration
from boneage_keras.model import build_model


def _val_paths(run, bulk_dir, n=24):
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    val = split[split["split"] == "val"].head(n)
    return [str(bulk_dir / "images" / f"{i}.png") for i in val["id"]], val


def test_tta_views_are_the_documented_transforms():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    views = tta_views(images, len(TTA_VIEWS))
    assert len(views) == 8 and all(v.shape == images.shape for v in views)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], images[:, :, ::-1, :])
    for view in views[2:]:
        assert not np.allclose(view, images)
    shift = round(0.04 * 32)   # shift-right moves content right, fills black on the left
    np.testing.assert_array_equal(views[4][:, :, shift:, :], images[:, :, :-shift, :])
    assert (views[4][:, :, :shift, :] == 0).all()
    assert len(tta_views(images, 3)) == 3
    with pytest.raises(DataError, match="--tta 9: choose 1"):
        tta_views(images, 9)


def test_interval_calibration_detects_narrow_and_wide_intervals():
    rng = np.random.default_rng(1)
    std = rng.uniform(2, 10, 20000)
    truth = rng.uniform(0, 228, 20000)
    pred = truth + rng.normal(0, std)
    honest = interval_calibration(truth, pred, std)
    assert honest["coverage"] == pytest.approx(0.9, abs=0.01)
    assert honest["verdict"] == "calibrated" and honest["scale_for_nominal"] == \
        pytest.approx(1.0, abs=0.03)
    assert honest["curve"]["0.5"] == pytest.approx(0.5, abs=0.02)
    assert interval_calibration(truth, pred, std / 2)["verdict"].startswith("over-confident")
    wide = interval_calibration(truth, pred, std * 2)
    assert wide["verdict"].startswith("under-confident") and wide["coverage"] > 0.99
    assert wide["mean_width"] == pytest.approx(2 * honest["mean_width"], rel=1e-6)


def test_mc_dropout_samples_vary_and_leave_the_model_alone(trained_run, bulk_dir):
    paths, _ = _val_paths(trained_run, bulk_dir, 16)
    predictor = KerasPredictor(open_model(trained_run), "small")
    before = predict_images(predictor, paths, progress=False).predicted
    out = predict_images(predictor, paths, tta=1, mc_samples=8, progress=False)
    np.testing.assert_allclose(out.predicted, before, atol=0.05)   # point: dropout off
    assert out.std is not None and (out.std > 0).all() and np.isfinite(out.std).all()
    # the interval describes the sampled distribution: about 90% of fresh MC samples
    # fall inside it (8 samples estimate the std, so allow 80-97%)
    from boneage_keras.inference import dropout_on_copy
    from boneage_keras.inference import open_model as load

    sampler = dropout_on_copy(load(trained_run))
    images = np.stack([_load(p, 64, "stretch", False) for p in paths]).astype("float32")
    fresh = np.stack([np.asarray(sampler.predict_on_batch(images)).ravel()
                      for _ in range(60)])
    inside = ((fresh >= out.lower) & (fresh <= out.upper)).mean()
    assert 0.8 <= inside <= 0.97, inside
    again = predict_images(predictor, paths, progress=False).predicted
    np.testing.assert_allclose(again, before, atol=0.05)     # the model is unchanged
    cfg = load_config(None, ["model.backbone=resnet18", "model.weights=none",
                             "data.image_size=32", "model.head_units=0"])
    with pytest.raises(ModelFileError, match="no Dropout layer"):
        predict_images(build_model(cfg), paths[:2], mc_samples=4, progress=False)


def test_tta_changes_and_averages_predictions(trained_run, bulk_dir):
    paths, _ = _val_paths(trained_run, bulk_dir, 16)
    predictor = KerasPredictor(open_model(trained_run), "small")
    single = predict_images(predictor, paths, progress=False)
    out = predict_images(predictor, paths, tta=4, progress=False)
    # (CPU convolutions are not bit-reproducible across calls: 0.05 months slack)
    np.testing.assert_allclose(out.no_tta, single.predicted, atol=0.05)
    assert np.abs(out.predicted - single.predicted).max() > 0.5
    # the TTA prediction is the mean of the views (each view predicted here in its own
    # batches, whose different sizes take other CPU kernels: measured up to 0.11 months
    # apart with one thread; the views themselves move predictions by > 0.5)
    per_view = [predict_images(predictor, paths, progress=False,
                               reader=lambda p, s, r, c, k=k: tta_views(
                                   _load(p, s, r, c)[None], 4)[k][0]).predicted
                for k in range(4)]
    np.testing.assert_allclose(out.predicted, np.mean(per_view, axis=0), atol=0.2)


def _load(path, image_size, geometry, random_crop):
    from boneage_keras.images import load_image

    return load_image(path, image_size, geometry, random_crop)


@pytest.fixture(scope="module")
def val_subset(trained_run, bulk_dir, tmp_path_factory):
    """40 of the run's validation images as a flat data set (links, not copies)."""
    _, val = _val_paths(trained_run, bulk_dir, 40)
    root = tmp_path_factory.mktemp("val40")
    (root / "images").mkdir()
    for image_id in val["id"]:
        (root / "images" / f"{image_id}.png").symlink_to(bulk_dir / "images" /
                                                        f"{image_id}.png")
    val[["id", "boneage", "male"]].to_csv(root / "labels.csv", index=False)
    return root


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_cli_evaluate_with_tta_and_mc_dropout(trained_run, val_subset, tmp_path, backend):
    out = tmp_path / "eval"
    # with TTA and MC dropout, then without either (one process on the backend)
    proc, plain_proc = run_cli_batch([
        ["evaluate", "--model", trained_run / "best.keras", "--data-dir", val_subset,
         "--out", out, "--tta", "3", "--mc-samples", "6"],
        ["evaluate", "--model", trained_run / "best.keras", "--data-dir", val_subset,
         "--out", tmp_path / "plain"]], backend=backend)
    assert proc.returncode == plain_proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["tta"]["views"] == 3
    assert metrics["tta"]["mae_without_tta"] != pytest.approx(metrics["mae"], abs=1e-4)
    # the figure without TTA is what a separate evaluation without TTA measures
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert metrics["tta"]["mae_without_tta"] == pytest.approx(plain["mae"], abs=0.05)
    unc = metrics["uncertainty"]
    assert unc["source"] == "MC dropout (6 samples)"
    preds = pd.read_csv(out / "predictions.csv")
    assert {"predicted_no_tta", "std", "lower90", "upper90"} <= set(preds.columns)
    inside = (preds["lower90"] <= preds["boneage"]) & (preds["boneage"] <= preds["upper90"])
    assert inside.mean() == pytest.approx(unc["coverage"])
    assert (out / "calibration.png").stat().st_size > 10_000
    report = (out / "report.html").read_text()
    assert "calibration" in report and "Uncertainty" in report
    assert "TTA (3 views)" in proc.stdout and "coverage" in proc.stdout


def test_ensemble_of_runs_and_models(trained_run, tmp_path, bulk_dir):
    twin = tmp_path / "twin"
    shutil.copytree(trained_run, twin, ignore=shutil.ignore_patterns("eval*"))
    shutil.copy(trained_run / "last.keras", twin / "best.keras")   # a second member
    result = evaluate_run([trained_run, twin], "val", out_dir=tmp_path / "ens")
    preds = result.predictions
    members = result.metrics["ensemble"]["members"]
    assert [m["model"] for m in members] == ["small", "twin"]
    np.testing.assert_allclose(preds["predicted"], (preds["member_0"] + preds["member_1"]) / 2,
                               atol=1e-4)
    truth = preds["boneage"]
    for k, member in enumerate(members):
        assert member["mae"] == pytest.approx(np.mean(np.abs(preds[f"member_{k}"] - truth)))
    # the spread between the members is the uncertainty
    np.testing.assert_allclose(preds["std"], np.abs(preds["member_0"] - preds["member_1"])
                               / np.sqrt(2), atol=1e-3)
    # compare works on ensembles: the ensemble vs its first member
    single = evaluate_run(trained_run, "val", out_dir=tmp_path / "single")
    diff = compare_predictions(tmp_path / "single", tmp_path / "ens", 200)
    assert diff["overall"]["n"] == len(preds)
    assert diff["overall"]["mae_a"] == pytest.approx(single.metrics["mae"])
    # members must have held the evaluated images out
    split = pd.read_csv(twin / "split.csv", dtype={"id": str})
    split.loc[split["split"] == "val", "split"] = "train"
    split.to_csv(twin / "split.csv", index=False)
    with pytest.raises(DataError, match="twin trained on .* ensemble runs must share"):
        evaluate_run([trained_run, twin], "val", out_dir=tmp_path / "bad")
    # the CLI: --model repeated for predict, MC samples across both members
    paths, _ = _val_paths(trained_run, bulk_dir, 5)
    proc = cli_here(["predict", "--model", str(trained_run / "best.keras"), "--model",
                    str(trained_run / "last.keras"), "--mc-samples", "4", *paths])
    table = pd.read_csv(__import__("io").StringIO(proc.stdout))
    assert list(table.columns) == ["id", "predicted", "member_0", "member_1", "std",
                                   "lower90", "upper90"]
    assert len(table) == 5 and (table["std"] > 0).all()
