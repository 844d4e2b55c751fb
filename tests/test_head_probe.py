"""experiments/head_probe.py, the measurement behind the account of the
improved model's collapse (experiments/), runs on real images and measures the model's own head."""

import json
import subprocess
import sys

from conftest import REPO, backend_env


def test_head_probe_recomputes_the_models_head_as_it_trains(tmp_path, bulk_dir):
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "head_probe.py"),
         "--config", "resnet18-improved", "--data-dir", str(bulk_dir), "--images", "120",
         "--steps", "6", "--every", "3", "--set", "data.image_size=32",
         "--set", "augment.engine=numpy", "--set", "data.loader=pydataset",
         "--out", str(out)],
        cwd=tmp_path, env=backend_env("torch"), capture_output=True, text=True,
        timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["probes"]
    assert [r["step"] for r in rows] == [0, 3, 6]
    # the head recomputed from the features is the model's prediction, in months
    assert all(r["model_gap"] < 0.01 for r in rows), [r["model_gap"] for r in rows]
    # untrained: the zero-initialised output gives every image the training mean
    assert rows[0]["prediction_std"] == 0 and rows[0]["w_out_norm"] == 0
    assert 0 < rows[0]["active_units"] <= 256
    # six steps later the output layer has moved and the predictions spread
    assert rows[-1]["w_out_norm"] > 0 and rows[-1]["prediction_std"] > 0
    assert "active" in proc.stdout and "pred std" in proc.stdout     # the table
