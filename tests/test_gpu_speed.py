"""benchmarks/gpu_speed.py runs end to end on a CPU at a small size, so the GPU
comparison keeps working where no GPU is at hand: native PyTorch, Keras on torch and the
input pipeline, in one table. (The JAX contender runs the same code as torch's in a JAX
process; compiling its step made this test a third longer, and a failing contender
leaves an error row on the GPU, not a lost run.)"""

import json
import subprocess
import sys

from conftest import REPO, backend_env


def test_gpu_speed_script_runs_on_cpu(tmp_path, sample_dir):
    out = tmp_path / "speed.json"
    scratch = tmp_path / "tmp"                  # the script's temporary files
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_speed.py"), "--size", "32",
         "--batches", "2", "--steps", "2", "--warmup", "1", "--quick", "--images", "16",
         "--workers", "2", "--backends", "torch", "--data-dir", str(sample_dir),
         "--out", str(out)],
        cwd=tmp_path, env={**backend_env("torch"), "TMPDIR": str(scratch)},
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    # the pipeline's image cache, made for the run, is gone after it
    assert not list(scratch.glob("gpu-speed-cache-*")), list(scratch.iterdir())
    rows = report["rows"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    contenders = {(r["contender"], r["variant"], r.get("precision")) for r in rows}
    assert {("native", "eager", "fp32"), ("keras-torch", "eager", "fp32"),
            ("pipeline", "pydataset/keras", None)} <= contenders
    # like is compared with like: the native anchor and our Keras model are the same
    # network (ResNet50 + Dense256-Dropout-Dense1 head); Keras' ResNet50 adds conv
    # biases (26,560 parameters), nothing else
    native = next(r["parameters"] for r in rows if r["contender"] == "native")
    for r in rows:
        if r["contender"].startswith("keras"):
            assert r["parameters"] - native == 26560, (r["contender"], r["parameters"])
    # every training row is compared with native at its batch size and precision
    assert all("ratio_to_native" in r for r in rows if r["contender"] != "pipeline")
    assert "| native | eager | fp32 | 2 |" in proc.stdout
    # the table is printed after every contender (a run cut short keeps its figures):
    # native's row first alone, last in the full table
    assert proc.stdout.count("| native | eager | fp32 | 2 |") == 3
