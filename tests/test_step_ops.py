"""benchmarks/step_ops.py counts the ops of one training step, ours through Keras on
torch against the native PyTorch anchor, at a small size on this CPU."""

import json
import subprocess
import sys

from conftest import REPO, backend_env


def test_step_ops_counts_both_steps_by_kind(tmp_path):
    out = tmp_path / "ops.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_ops.py"), "--size", "32",
         "--batch", "2", "--out", str(out)],
        cwd=tmp_path, env=backend_env("torch"), capture_output=True, text=True,
        timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["contender"]: r for r in report["rows"]}
    native, ours = rows["native"], rows["keras-torch"]
    # the same network on both sides: ResNet50's 53 convolutions, forward and backward
    assert native["convolutions"] == ours["convolutions"] == 2 * 53
    # batch normalization is fused on both sides; ours is one op per layer and
    # direction (native_batch_norm and its backward)
    assert native["batch_norm_ops"] >= 2 * 53
    assert ours["batch_norm_ops"] == 2 * 53
    for row in (native, ours):
        assert row["aten_ops"] > row["convolutions"] + row["copies"]
    assert "| native eager, channels-last, fused Adam |" in proc.stdout
    assert "| keras-torch eager |" in proc.stdout


def test_step_ops_refuses_another_backend(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_ops.py")], cwd=tmp_path,
        env=backend_env("jax"), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "KERAS_BACKEND=jax: the counter profiles the torch backend" in proc.stderr
