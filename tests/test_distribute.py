"""Data-parallel training (boneage_keras.distribute) on this CPU, on real images:
JAX over 2 virtual devices and over 2 processes, TensorFlow over 2 logical CPU devices,
torch over 2 processes under torchrun (gloo); one step on 2 replicas against one device;
every image once per epoch; only the chief writes; a killed process under torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, backend_env

from boneage_keras.config import ConfigError, geometry, load_config
from boneage_keras.data import age_balance_weights
from boneage_keras.distribute import Replicas, shard
from boneage_keras.images import load_image
from boneage_keras.loaders import BoneAgeDataset
from boneage_keras.train import make_optimizer

STEP = str(REPO / "tests" / "distributed_step.py")
TINY = ["--set", "model.backbone=resnet18", "--set", "model.weights=none",
        "--set", "data.image_size=32", "--set", "data.max_images=80",
        "--set", "train.batch_size=16", "--set", "data.workers=1",
        "--set", "distribute.strategy=data_parallel",
        # the NumPy augmentation engine: no TensorFlow and keras-cv to import in each
        # process (about 3.5 s each) where the backend does not need them
        "--set", "augment.engine=numpy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(bulk_dir: Path, n: int) -> pd.DataFrame:
    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str}).head(n)
    return labels.assign(path=[str(bulk_dir / "images" / f"{i}.png") for i in labels["id"]],
                         male=labels["male"].astype(str).str.lower().eq("true"))


def _steps(output: str) -> list[dict]:
    return [json.loads(line.split("@@STEP@@", 1)[1]) for line in output.splitlines()
            if "@@STEP@@" in line]


def _best_lines(output: str) -> list[str]:
    return sorted(line.split("] ", 1)[1] for line in output.splitlines()
                  if "] best epoch" in line)


def _torchrun(args: list[str], logs: Path, nproc: int = 2) -> list[str]:
    """torchrun writing each process's stdout and stderr to its own file under
    ``logs`` (their lines would interleave in one stream)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "--log-dir", str(logs), "--redirects", "3",
            *args]


def _rank_output(logs: Path, name: str = "stdout.log") -> str:
    return "\n".join(p.read_text() for p in sorted(logs.rglob(name)))


def _val_count_exact(history: pd.DataFrame, n_val: int) -> bool:
    """Validation tolerance accuracy is k / n_val for an integer k: the padding of the
    last batch (weight 0) was not counted, nor an image twice."""
    k = history["val_tolerance_accuracy"].to_numpy() * n_val
    return bool(np.allclose(k, np.round(k), atol=1e-3))


# --- shards --------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [2, 4])
def test_every_image_once_per_epoch_over_the_processes(bulk_dir, processes):
    table = _table(bulk_dir, 37)   # 37: the last global batch of 8 is padded
    cfg = load_config("cpu-bench", ["data.image_size=32", "train.batch_size=8",
                                    "augment.horizontal_flip=false", "model.use_sex=false"])
    for training in (True, False):
        # training images carry the recipe's age-bin weights (mean 1), validation's are 1
        expected = age_balance_weights(table["boneage"].to_numpy(),
                                       cfg.train.age_balance if training else 0.0)
        assert (np.ptp(expected) > 0) == training
        seen, weights, orders = [], 0.0, []
        for index in range(processes):
            data = BoneAgeDataset(table, cfg, training=training,
                                  replicas=Replicas("torch", replicas=processes,
                                                    processes=processes, index=index))
            for epoch in range(2):
                data.on_epoch_begin()   # as fit calls it, before every epoch
                orders.append(data.order.copy())
                for step in range(len(data)):
                    (images, labels, w) = data[step]
                    assert len(images) == 8 // processes   # equal steps everywhere
                    positions = data.positions[step * len(images):(step + 1) * len(images)]
                    for row, pos in enumerate(positions):
                        if pos < 0:
                            assert w[row] == 0 and not images[row].any()
                            continue
                        assert w[row] == expected[pos]
                        assert labels[row] == table["boneage"].iloc[pos]
                        if epoch == 0:
                            seen.append(int(pos))
                    weights += float(w.sum())
                    if step == 0 and index == 0 and epoch == 0:  # the real pixels
                        first = positions[0]
                        np.testing.assert_array_equal(
                            images[0], load_image(table["path"].iloc[first], 32, geometry(cfg.data)))
        assert sorted(seen) == list(range(37))          # each image exactly once
        assert weights == pytest.approx(2 * 37)
        if training:   # a new shuffle each epoch, the same on every process
            assert not np.array_equal(orders[0], orders[1])
            assert np.array_equal(orders[0], orders[2])


def test_shard_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ConfigError, match="train.batch_size.*does not divide over 3"):
        shard(np.arange(10), 8, 3, 0)
    assert sorted(np.concatenate([shard(np.arange(10), 6, 3, i) for i in range(3)])
                  .tolist()) == [-1, -1] + list(range(10))


def test_settings_refused_without_data_parallel_and_lr_scaling():
    with pytest.raises(ConfigError, match="distribute.strategy.*data_parallel when"):
        load_config("cpu-bench", ["distribute.cpu_devices=2"])
    cfg = load_config("cpu-bench", ["train.batch_size=256", "distribute.scale_lr=linear",
                                    "distribute.lr_batch_size=64",
                                    "train.learning_rate=0.001"])
    assert float(make_optimizer(cfg).learning_rate) == pytest.approx(0.004)
    with pytest.raises(ConfigError, match="distribute.timeout_s"):
        load_config("cpu-bench", ["distribute.timeout_s=1"])


# --- one step on two replicas equals the step on one device; training -----------------


def _step_then(backend: str, bulk_dir: Path, *commands: list[str]) -> str:
    """Run the step check, then ``commands`` in the same process; its stdout."""
    proc = subprocess.run([sys.executable, STEP, str(bulk_dir), "--bn",
                           *[a for c in commands for a in ("--", *c)]],
                          cwd=REPO, env=backend_env(backend), capture_output=True,
                          text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (step,) = _steps(proc.stdout)
    assert step["replicas"] == 2 and step["moved"] > 1e-3
    assert step["max_diff"] < 1e-5, step
    return proc.stdout


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_in_one_process(tmp_path, bulk_dir, backend):
    """JAX (keras.distribution) and TensorFlow (MirroredStrategy) over 2 CPU devices:
    the step with batch normalization (global on JAX by construction, synchronized on
    TensorFlow) matches one device; then a CLI training on real images, and (JAX)
    bench's one-replica and two-replica figures."""
    sync = ["--set", "distribute.sync_batchnorm=true"] if backend == "tensorflow" else []
    two = [*TINY, *sync, "--set", "distribute.cpu_devices=2"]
    # one backend is enough for the figures (cpu-bench has the sex input: a dict batch)
    bench = [["bench", "--config", "cpu-bench", *two, "--steps", "1"]] \
        if backend == "jax" else []
    out = _step_then(
        backend, bulk_dir,
        ["train", "--config", "cpu-bench", "--data-dir", str(bulk_dir), *two,
         "--set", "train.epochs=1", "--set", f"train.output_dir={tmp_path}",
         "--set", "train.run_name=r"], *bench)
    if bench:
        scaling = json.loads(out[out.index("{\n"):])["replica_scaling"]
        assert (scaling["replicas"], scaling["processes"]) == (2, 1)
        assert scaling["one_replica_images_per_s"] > 0
        assert scaling["replicas_images_per_s"] > 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (info["replicas"], info["processes"], info["status"]) == (2, 1, "finished")
    assert info["distribute"]["engine"] == {
        "jax": "keras.distribution.DataParallel",
        "tensorflow": "tf.distribute.MirroredStrategy"}[backend]
    history = pd.read_csv(tmp_path / "r" / "history.csv")
    split = pd.read_csv(tmp_path / "r" / "split.csv")
    assert len(history) == 1 and _val_count_exact(history, (split["split"] == "val").sum())


def test_torchrun_two_processes_a_killed_one_and_the_restart(tmp_path, bulk_dir):
    """torch under torchrun --max-restarts 1 (gloo), each process running the step check
    and then a CLI training in which process 1 would fail on any write
    (files.forbid_writes). In epoch 2, SIGKILL to process 1 (it sends it itself at the
    epoch's second step, so the kill lands mid-epoch on any machine): process 0 stops
    at once naming it; torchrun starts both again and they resume the same run at epoch
    2; both report the same reduced metrics. Then one process resumes it (other
    replicas)."""
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    env = {**backend_env("torch"), "BONEAGE_CACHE_DIR": str(tmp_path / "cache")}
    torchrun = subprocess.Popen(
        _torchrun(["--max-restarts", "1", STEP, str(bulk_dir), "--kill-process-1-in-epoch",
                   "2", "--", "train", "--config", "cpu-bench", "--data-dir", str(bulk_dir),
                   *TINY, "--set", "train.epochs=2", "--set", f"train.output_dir={runs}"],
                  logs),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        process_group=0)
    try:
        out, _ = torchrun.communicate(timeout=400)
        ended = time.time()
    finally:
        if torchrun.poll() is None:   # the launcher and its workers
            os.killpg(torchrun.pid, signal.SIGKILL)
    (first,) = [d for d in logs.rglob("attempt_0")]
    assert "Epoch 2/2" in _rank_output(first)   # killed in epoch 2, not before
    (killed,) = [float(line.split("@@KILLED@@")[1]) for line in
                 _rank_output(first).splitlines() if "@@KILLED@@" in line]
    stopped = ended - killed   # process 0's stop and the whole restarted attempt
    errors = _rank_output(logs, "stderr.log")
    assert torchrun.returncode == 0, out[-2000:] + errors[-3000:]
    assert "process 0 of 2 lost process 1" in errors
    # torchrun names the first failure it sees: the killed process, or process 0
    # stopping on its own (exit 2) when that came first
    assert re.search(r"exitcode: -9\) local_rank: 1|exitcode: 2\) local_rank: 0", out), out
    assert "torchrun restart 1" in errors and stopped < 240
    steps = _steps(_rank_output(logs))
    assert sorted(s["process"] for s in steps) == [0, 0, 1, 1]   # both attempts
    assert all(s["max_diff"] < 1e-5 and s["moved"] > 1e-3 for s in steps), steps
    (last,) = [d for d in logs.rglob("attempt_1")]
    best = _best_lines(_rank_output(last))
    assert len(best) == 2 and best[0] == best[1]      # the same reduced metrics
    (run,) = list(runs.iterdir())                      # one run folder, one name
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["backup", "best.keras", "config.yaml", "curves.png", "history.csv",
         "last.keras", "run.json", "split.csv", "train.log"])
    assert "resuming at epoch 2" in (run / "train.log").read_text()
    info = json.loads((run / "run.json").read_text())
    assert (info["replicas"], info["processes"]) == (2, 2)
    assert info["distribute"]["engine"] == "torch.distributed (gloo)"
    assert info["versions"]["torch"] and info["versions"]["keras"]
    history = pd.read_csv(run / "history.csv")
    split = pd.read_csv(run / "split.csv")
    assert len(history) == 2 and _val_count_exact(history, (split["split"] == "val").sum())
    # the same run continued by one process
    one = subprocess.run([sys.executable, str(REPO / "cli.py"), "train", "--resume", str(run),
                          "--set", "train.epochs=3", "--set", "distribute.strategy=none"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming at epoch 3" in one.stderr
    assert len(pd.read_csv(run / "history.csv")) == 3
    assert json.loads((run / "run.json").read_text())["replicas"] == 1


def test_multi_worker_tensorflow_is_refused_in_one_line(tmp_path, bulk_dir):
    """TF_CONFIG (MultiWorkerMirroredStrategy) fails inside Keras 3.15's trainer: the
    package says so and what to use instead, with exit code 2 and no traceback."""
    tf_config = json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                            "task": {"type": "worker", "index": 0}})
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "train", "--config", "cpu-bench",
         "--data-dir", str(bulk_dir), *TINY, "--set", f"train.output_dir={tmp_path}"],
        cwd=REPO, env={**backend_env("tensorflow"), "TF_CONFIG": tf_config},
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "TF_CONFIG is set: multi-worker TensorFlow fails inside Keras" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_jax_two_processes_a_killed_one_and_the_resume_on_one(tmp_path, bulk_dir):
    """JAX over 2 processes, no launcher: epoch 1 runs as 2 replicas in 2 processes;
    then SIGKILL to process 1; process 0 stops within two minutes naming it (our line
    after gloo's connection error, or JAX's own heartbeat report); then one process
    resumes the run at epoch 2."""
    port = _free_port()
    common = ["--set", "train.epochs=2", "--set", f"train.output_dir={tmp_path}",
              "--set", "train.run_name=r", "--set", "distribute.timeout_s=20",
              "--set", f"distribute.coordinator=127.0.0.1:{port}",
              "--set", "distribute.num_processes=2"]
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "train", "--config", "cpu-bench",
         "--data-dir", str(bulk_dir), *TINY, *common,
         "--set", f"distribute.process_id={i}"],
        cwd=REPO, env=backend_env("jax"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, process_group=0) for i in range(2)]
    try:
        deadline = time.time() + 240
        while not (tmp_path / "r" / "history.csv").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert (tmp_path / "r" / "history.csv").is_file(), "epoch 1 never finished"
        info = json.loads((tmp_path / "r" / "run.json").read_text())
        assert (info["replicas"], info["processes"]) == (2, 2)
        procs[1].kill()
        killed = time.time()
        _, err = procs[0].communicate(timeout=180)
        stopped = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"process 0 stopped {stopped:.1f} s after the kill")
    assert procs[0].returncode != 0 and stopped < 120
    assert "process 0 of 2 lost process 1" in err or "task 1 heartbeat timeout" in \
        err.lower(), err[-3000:]
    one = subprocess.run([sys.executable, str(REPO / "cli.py"), "train", "--resume",
                          str(tmp_path / "r"), "--set", "distribute.strategy=none",
                          "--set", "distribute.num_processes=null",
                          "--set", "distribute.coordinator=null",
                          "--set", "distribute.process_id=null"],
                         cwd=REPO, env=backend_env("jax"), capture_output=True, text=True,
                         timeout=300, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming at epoch 2" in one.stderr
    assert len(pd.read_csv(tmp_path / "r" / "history.csv")) == 2
    assert json.loads((tmp_path / "r" / "run.json").read_text())["replicas"] == 1
