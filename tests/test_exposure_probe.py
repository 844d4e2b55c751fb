"""experiments/exposure_probe.py, the measurement behind the recipe's exposure changes
(experiments/), re-exposes real images as it says and scores a trained model on them."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
from conftest import REPO, backend_env, cli_here


def _probe_module():
    spec = importlib.util.spec_from_file_location(
        "exposure_probe", REPO / "experiments" / "exposure_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_changes_re_expose_a_real_radiograph(bulk_dir):
    from boneage_keras.images import load_image

    path = str(min((bulk_dir / "images").glob("*.png")))
    readers = _probe_module()._changes()
    plain = load_image(path, 96, "stretch", False).astype(np.float64)
    images = {name: read(path, 96, "stretch", False) for name, read in readers.items()}
    assert all(im.dtype == np.uint8 and im.shape == (96, 96, 1) for im in images.values())
    assert np.array_equal(images["none"], plain.astype(np.uint8))
    # 25 levels, clipped at black and white (much of a radiograph is black)
    darker, brighter = images["darker"].astype(np.float64), images["brighter"]
    room = plain >= 25
    assert room.mean() > 0.2 and ((plain - darker)[room] == 25).all()
    assert (darker[~room] == 0).all()
    assert ((brighter.astype(np.float64) - plain)[plain <= 230] == 25).all()
    # contrast about the image's own mean: the spread scales, the mean stays
    for factor in (0.8, 1.2):
        changed = images[f"contrast {factor}"].astype(np.float64)
        assert abs(changed.mean() - plain.mean()) < 2.0
        assert abs(changed.std() / plain.std() - factor) < 0.05
    # gamma > 1 darkens every mid-tone, < 1 brightens; black and white stay
    assert (images["gamma 1.25"] <= plain).all() and (images["gamma 0.8"] >= plain).all()
    assert images["gamma 1.25"].mean() < plain.mean() - 3


def test_probe_scores_a_trained_model_on_its_split(trained_run, bulk_dir, tmp_path):
    out = tmp_path / "probe.json"
    model = trained_run / "best.keras"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "exposure_probe.py"), "--model",
         str(model), "--data-dir", str(bulk_dir), "--split", "val",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        cwd=tmp_path, env=backend_env("torch"), capture_output=True, text=True,
        timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["change"] for r in rows] == ["none", "darker", "brighter", "contrast 0.8",
                                           "contrast 1.2", "gamma 0.8", "gamma 1.25"]
    # the unchanged images score what evaluation gives on the same split
    cli_here(["evaluate", "--model", str(model), "--data-dir", str(bulk_dir), "--split",
              "val", "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rows[0]["n"] == metrics["n"]
    assert abs(rows[0]["mae"] - metrics["mae"]) < 0.05
    # a model trained without exposure changes reads re-exposed images differently
    assert max(abs(r["mean_error"] - rows[0]["mean_error"]) for r in rows[1:]) > 0.5
    for r in rows[1:]:
        assert r["ci95"][0] <= r["mae_diff"] <= r["ci95"][1]
    assert "gamma 1.25" in proc.stdout and "vs none" in proc.stdout      # the table
