"""The learning benchmark (`cli.py benchmark`) end to end on real images, tiny: both
variants are trained, evaluated with and without TTA, and reported side by side; a
second call reuses the finished runs instead of training again."""

import json

import pandas as pd
import pytest
from conftest import run_cli


def test_benchmark_reports_without_and_with_sex(tmp_path, bulk_dir):
    args = ["benchmark", "--data-dir", str(bulk_dir), "--set", "data.max_images=160",
            "--set", "data.image_size=32", "--set", "train.epochs=1", "--out",
            str(tmp_path / "bench"), "--tta", "2"]
    proc = run_cli(args)
    result = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["image", "image+sex", "ensemble of both"]
    split = pd.read_csv(tmp_path / "bench" / "image" / "split.csv", dtype={"id": str})
    assert (split.equals(pd.read_csv(tmp_path / "bench" / "image+sex" / "split.csv",
                                     dtype={"id": str})))   # same validation images
    for name in ("image", "image+sex"):
        metrics = json.loads((tmp_path / "bench" / name / "eval-val" /
                              "metrics.json").read_text())
        preds = pd.read_csv(tmp_path / "bench" / name / "eval-val" / "predictions.csv")
        truth = preds["boneage"]
        assert rows[name]["val_mae_tta"] == pytest.approx(
            (preds["predicted"] - truth).abs().mean(), abs=1e-6)
        assert rows[name]["val_mae"] == pytest.approx(
            (preds["predicted_no_tta"] - truth).abs().mean(), abs=1e-6)
        assert metrics["n"] == len(preds)
        assert rows[name]["n_val"] == (split["split"] == "val").sum() == 16
        assert rows[name]["train_seconds"] > 0
    config = (tmp_path / "bench" / "image+sex" / "config.yaml").read_text()
    assert "use_sex: true" in config
    assert "image+sex" in proc.stdout and "MAE TTA2" in proc.stdout
    assert f"{rows['image']['val_mae']:.2f}" in proc.stdout
    assert "step - loss:" in proc.stdout     # the training progress the rerun must not show
    models = [tmp_path / "bench" / name / "best.keras" for name in ("image", "image+sex")]
    written = [m.stat().st_mtime_ns for m in models]
    again = run_cli(args)   # finished variants are reused, not retrained
    assert "step - loss:" not in again.stdout + again.stderr
    assert [m.stat().st_mtime_ns for m in models] == written
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["rows"][0][
        "train_seconds"] is None
