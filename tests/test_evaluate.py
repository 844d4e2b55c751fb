"""evaluate / predict / compare on real images, through the library and the CLI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_here
from PIL import Image
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from boneage_keras.compare import compare_predictions
from boneage_keras.config import load_config
from boneage_keras.data import DataError
from boneage_keras.evaluate import FIGURES
from boneage_keras.inference import ModelFileError, open_model
from boneage_keras.model import build_model


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = cli_here(["evaluate", str(trained_run), "--split", "val", "--out", str(out)])
    return out, proc.stdout


def test_metrics_agree_with_sklearn(evaluated):
    out, stdout = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["id", "male", "boneage", "predicted", "error",
                                   "within_tolerance"]
    y, p = preds["boneage"].to_numpy(), preds["predicted"].to_numpy()
    assert list(metrics)[:5] == ["mae", "rmse", "r2", "bias", "tolerance_accuracy"]
    assert {"by_age_group", "by_sex", "accuracy_at"} <= set(metrics)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-6)
    assert metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)), abs=1e-6)
    assert metrics["r2"] == pytest.approx(r2_score(y, p), abs=1e-6)
    assert metrics["bias"] == pytest.approx(np.mean(p - y), abs=1e-6)
    assert metrics["tolerance_accuracy"] == pytest.approx(np.mean(np.abs(p - y) <= 12))
    assert metrics["accuracy_at"]["24"] >= metrics["accuracy_at"]["12"] >= \
        metrics["accuracy_at"]["6"]
    groups = metrics["by_age_group"]
    assert sum(g["n"] for g in groups.values()) == len(y)
    assert groups["0-60"]["n"] == int((y <= 60).sum())
    mid = (y > 120) & (y <= 180)
    assert groups["121-180"]["mae"] == pytest.approx(mean_absolute_error(y[mid], p[mid]))
    male = preds["male"].to_numpy(bool)
    assert metrics["by_sex"]["male"]["mae"] == pytest.approx(
        mean_absolute_error(y[male], p[male]), abs=1e-6)
    assert f"MAE={metrics['mae']:.2f}" in stdout


def test_figures_and_report_are_valid(evaluated):
    out, _ = evaluated
    for name in FIGURES + ("curves.png",):
        with Image.open(out / name) as image:
            image.verify()
        assert Image.open(out / name).size[0] > 300, name
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("data:image/png;base64,") == len(FIGURES) + 1
    assert "By age group" in page and "181-240" in page


def test_evaluate_model_on_full_size_images(trained_run, sample_dir, tmp_path):
    proc = cli_here(["evaluate", "--model", str(trained_run / "best.keras"), "--data-dir",
                    str(sample_dir), "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 60 and np.isfinite(metrics["mae"])
    assert "n=60" in proc.stdout


def test_predict_folder_single_image_and_test_csv(trained_run, sample_dir, tmp_path):
    model = str(trained_run / "best.keras")
    out = tmp_path / "folder.csv"
    cli_here(["predict", "--model", model, "--output", str(out), str(sample_dir / "images")])
    folder = pd.read_csv(out)
    assert list(folder.columns) == ["id", "predicted"] and len(folder) == 60
    assert folder["predicted"].between(0, 300).all()
    single = cli_here(["predict", "--model", model, str(sample_dir / "images" / "4360.png")])
    lines = single.stdout.strip().splitlines()
    assert lines[0] == "id,predicted" and lines[1].startswith("4360,")
    same = folder.loc[folder["id"] == 4360, "predicted"].item()
    assert float(lines[1].split(",")[1]) == pytest.approx(same, abs=0.01)
    # Kaggle test layout: boneage-test-dataset.csv (Case ID, Sex) + image folder
    kaggle = tmp_path / "kaggle"
    (kaggle / "boneage-test-dataset").mkdir(parents=True)
    cases = sorted(int(p.stem) for p in (sample_dir / "images").glob("*.png")
                   if int(p.stem) >= 4360)[:2]
    for case in cases:
        (kaggle / "boneage-test-dataset" / f"{case}.png").symlink_to(
            sample_dir / "images" / f"{case}.png")
    (kaggle / "boneage-test-dataset.csv").write_text(
        f"Case ID,Sex\n{cases[0]},M\n{cases[1]},F\n")
    rows = cli_here(["predict", "--model", model, str(kaggle / "boneage-test-dataset.csv")])
    lines = rows.stdout.strip().splitlines()
    assert lines[0] == "id,predicted" and [line.split(",")[0] for line in lines[1:]] == \
        [str(c) for c in cases]


def test_compare_two_models(trained_run, bulk_dir, tmp_path):
    from boneage_keras.data import load_dataset
    from boneage_keras.evaluate import evaluate_table

    # B: the trained model on its validation split, through the CLI
    cli_here(["evaluate", "--model", str(trained_run / "best.keras"), "--data-dir",
             str(bulk_dir), "--split", "val", "--out", str(tmp_path / "b")])
    # A: an untrained model (predicts the training mean) on the same images but 3
    cfg = load_config(trained_run / "config.yaml")
    split = pd.read_csv(trained_run / "split.csv")
    build_model(cfg, split.loc[split["split"] == "train", "boneage"].mean(), 40.0).save(
        tmp_path / "mean.keras")
    ids = pd.read_csv(tmp_path / "b" / "predictions.csv", dtype={"id": str})["id"]
    table = load_dataset(bulk_dir, check_images=False)[0].set_index("id").loc[ids]
    evaluate_table(open_model(tmp_path / "mean.keras"), table.reset_index().iloc[:-3],
                   tmp_path / "a")

    first = compare_predictions(tmp_path / "a", tmp_path / "b", n_resamples=500, seed=7)
    again = compare_predictions(tmp_path / "a", tmp_path / "b", n_resamples=500, seed=7)
    o = first["overall"]
    assert o == again["overall"]                           # reproducible with the seed
    assert o["ci_low"] <= o["difference"] <= o["ci_high"]  # CI holds the point estimate
    assert o["difference"] < 0 and o["ci_high"] < 0        # the trained model is better
    assert len(first["only_in_b"]) == 3 and first["only_in_a"] == []
    assert sum(g["n"] for g in first["by_age_group"].values()) == o["n"]
    proc = cli_here(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--resamples",
                    "500", "--seed", "7", "--out", str(tmp_path / "cmp.json")])
    assert f"{o['difference']:+.2f}" in proc.stdout and "only in B" in proc.stdout
    assert json.loads((tmp_path / "cmp.json").read_text())["overall"] == o
    proc = cli_here(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                     str(tmp_path / "no-such-folder" / "cmp.json")], check=False)
    assert proc.returncode == 2 and "--out" in proc.stderr    # refused before any work


def test_bad_inputs_are_clear(trained_run, tmp_path, sample_dir):
    (tmp_path / "not.keras").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ModelFileError, match="not.keras is not a Keras model file"):
        open_model(tmp_path / "not.keras")
    image = str(sample_dir / "images" / "4360.png")
    proc = cli_here(["predict", "--model", str(tmp_path / "missing.keras"), image],
                   check=False)
    assert proc.returncode == 2 and "model file not found" in proc.stderr
    (tmp_path / "data" / "images").mkdir(parents=True)
    proc = cli_here(["evaluate", "--model", str(trained_run / "best.keras"), "--data-dir",
                    str(tmp_path / "data")], check=False)
    assert proc.returncode == 2 and "labels.csv" in proc.stderr
    bad = tmp_path / "b.csv"
    bad.write_text("id,predicted\n1,3\n")
    with pytest.raises(DataError, match="boneage"):
        compare_predictions(bad, bad)
    model = str(trained_run / "best.keras")
    # --output in a folder that does not exist: refused before predicting anything
    proc = cli_here(["predict", "--model", model, "--output",
                    str(tmp_path / "nowhere" / "p.csv"), image], check=False)
    assert proc.returncode == 2 and "the folder" in proc.stderr and "does not exist" in \
        proc.stderr and "Traceback" not in proc.stderr
    # a missing and a binary test CSV
    proc = cli_here(["predict", "--model", model, str(tmp_path / "gone.csv")], check=False)
    assert proc.returncode == 2 and "input not found" in proc.stderr
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 8)
    proc = cli_here(["predict", "--model", model, str(tmp_path / "binary.csv")], check=False)
    assert proc.returncode == 2 and "not a readable CSV" in proc.stderr
    # flags out of range
    for flag, value in (("--mc-samples", "-4"), ("--mc-samples", "1"), ("--tta", "0")):
        proc = cli_here(["predict", "--model", model, flag, value, image], check=False)
        assert proc.returncode == 2 and flag in proc.stderr, (flag, proc.stderr)


def test_predict_reads_what_it_can(trained_run, sample_dir, tmp_path):
    """One unreadable image among many: the rest are predicted, the failure is listed
    in an error column, and the command exits non-zero."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for image_id in ("1437", "1440", "1472"):
        (folder / f"{image_id}.png").symlink_to(sample_dir / "images" / f"{image_id}.png")
    (folder / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    out = tmp_path / "p.csv"
    proc = cli_here(["predict", "--model", str(trained_run / "best.keras"), "--output",
                    str(out), str(folder)], check=False)
    assert proc.returncode == 1, proc.stderr
    assert "1 of 4 images could not be read (9999)" in proc.stderr
    table = pd.read_csv(out, dtype={"id": str}, keep_default_na=False)
    assert table["id"].tolist() == ["1437", "1440", "1472", "9999"]
    assert table.loc[3, "predicted"] == "" and "cannot decode image" in table.loc[3, "error"]
    assert (table.loc[:2, "error"] == "").all()
    assert table.loc[:2, "predicted"].astype(float).between(0, 300).all()


def test_validation_figures_say_they_are_optimistic(trained_run, tmp_path):
    """A run with a test split is scored on it; without one, on the validation split
    that chose the checkpoint, and metrics.json, the table and the report say so."""
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png",
                                                                   "report.html"))
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    split.loc[split["split"] == "test", "split"] = "train"
    split.to_csv(run / "split.csv", index=False)
    proc = cli_here(["evaluate", str(run)])
    metrics = json.loads((run / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert metrics["split_note"].startswith("validation split, used for model selection: "
                                            "optimistic")
    assert "used for model selection: optimistic" in proc.stdout
    assert "used for model selection: optimistic" in (run / "report.html").read_text()
    proc = cli_here(["evaluate", str(trained_run), "--out", str(tmp_path / "test")])
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["split_note"] \
        .startswith("test split")


def test_metrics_json_is_valid_json_for_a_single_image(trained_run, sample_dir, tmp_path):
    data = tmp_path / "one"
    (data / "images").mkdir(parents=True)
    (data / "images" / "1437.png").symlink_to(sample_dir / "images" / "1437.png")
    (data / "labels.csv").write_text("id,boneage,male\n1437,100,True\n")
    cli_here(["evaluate", "--model", str(trained_run / "best.keras"), "--data-dir", str(data),
             "--out", str(tmp_path / "eval")])
    text = (tmp_path / "eval" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert metrics["n"] == 1 and metrics["r2"] is None    # R2 of one image: undefined


def test_evaluating_a_run_writes_nothing_into_its_data_folder(trained_run, tmp_path,
                                                              monkeypatch):
    """The decode record goes where the run kept it (data.cache_dir), so read-only or
    shared data folders stay as they were."""
    # without the suite's cache variable, as a user runs it: the data folder is where a
    # record with no cache_dir would go
    monkeypatch.delenv("BONEAGE_CACHE_DIR", raising=False)
    import shutil

    import yaml

    from boneage_keras.evaluate import evaluate_run

    source = Path(load_config(trained_run / "config.yaml").data.data_dir)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for png in (source / "images").iterdir():
        (data / "images" / png.name).symlink_to(png.resolve())
    shutil.copy(source / "labels.csv", data / "labels.csv")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.keras", "split.csv", "history.csv"):
        shutil.copy(trained_run / name, run / name)
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    cfg["data"].update(data_dir=str(data), cache_dir=str(tmp_path / "cache"))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    result = evaluate_run(run, out_dir=tmp_path / "out", recalibrate=True)
    assert len(result.predictions) == (pd.read_csv(run / "split.csv")["split"] == "test").sum()
    assert (tmp_path / "cache" / "decoded.csv").is_file()
    assert not (data / ".boneage-cache").exists()
    assert sorted(p.name for p in data.iterdir()) == ["images", "labels.csv"]
