"""End-to-end training through the CLI on real images, on both backends and loaders."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli

from boneage_keras.data import load_dataset, split_table, subsample
from boneage_keras.train import cosine_learning_rate

RUN_FILES = ("config.yaml", "split.csv", "history.csv", "best.keras", "last.keras",
             "curves.png", "train.log")


def test_cosine_schedule():
    lrs = [cosine_learning_rate(e, 1.0, 50, period=10) for e in range(21)]
    assert lrs[0] == 1.0 and lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert lrs[20] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5)
    warm = [cosine_learning_rate(e, 1.0, 10, warmup=2) for e in range(10)]
    assert warm[:3] == [0.5, 1.0, 1.0] and all(np.diff(warm[2:]) < 0)


@pytest.mark.parametrize("backend, loader", [("torch", "tfdata"), ("torch", "pydataset"),
                                             ("tensorflow", "tfdata"),
                                             ("tensorflow", "pydataset")])
def test_cli_train_writes_complete_run(tmp_path, bulk_dir, backend, loader):
    # ResNet50 with tf.data; the smaller ResNet18 with PyDataset keeps the suite short
    backbone = "resnet50" if loader == "tfdata" else "resnet18"
    proc = run_cli(["train", "--config", "configs/default.yaml", "--data-dir", str(bulk_dir),
                    "--set", "data.max_images=96", "--set", "data.image_size=32",
                    "--set", f"model.backbone={backbone}",
                    "--set", "model.weights=none", "--set", "train.epochs=2",
                    "--set", "train.batch_size=16", "--set", f"data.loader={loader}",
                    "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=run"],
                   backend=backend)
    assert "images: decoding the original files" in proc.stderr   # no cache prepared
    run = tmp_path / "run"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    assert {"val_mae", "val_tolerance_accuracy", "learning_rate"} <= set(history.columns)
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    assert list(split.columns) == ["id", "boneage", "male", "split"] and len(split) == 96
    # the split depends on the config and seed only, not on backend or loader
    table = subsample(load_dataset(bulk_dir, check_images=False)[0], 96, seed=42)
    expected = split_table(table, "random", 0.1, 0.0, seed=42)
    assert split["split"].tolist() == expected["split"].tolist()
    assert split["id"].tolist() == expected["id"].tolist()
    # best.keras reloads in a fresh process (tfdata runs: on the other backend too)
    code = ("import numpy as np; from boneage_keras.model import load_model;"
            f"m = load_model(r'{run / 'best.keras'}');"
            "p = m.predict(np.random.uniform(0, 255, (4, 32, 32, 1)), verbose=0);"
            "assert np.isfinite(p).all() and p.shape == (4, 1), p; print(float(p.mean()))")
    other = "tensorflow" if backend == "torch" else "torch"
    for b in (backend, other) if loader == "tfdata" else (backend,):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "KERAS_BACKEND": b}, timeout=300,
                             check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        assert 0 < float(out.stdout.strip().splitlines()[-1]) < 300


def test_interrupted_run_resumes_without_losing_epochs(tmp_path, bulk_dir):
    args = [sys.executable, str(REPO / "cli.py"), "train", "--data-dir", str(bulk_dir),
            "--set", "data.max_images=300", "--set", "data.image_size=32",
            "--set", "model.backbone=resnet18", "--set", "model.weights=none",
            "--set", "train.epochs=3", "--set", "train.batch_size=16",
            "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=run"]
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    history = tmp_path / "run" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err, err[-2000:]
    done = len(pd.read_csv(history))
    assert 1 <= done < 3
    assert (tmp_path / "run" / "last.keras").is_file()
    run_cli(["train", "--resume", str(tmp_path / "run")])
    epochs = pd.read_csv(history)["epoch"].tolist()
    assert epochs == [0, 1, 2], epochs     # continued where it stopped, nothing repeated
    assert (tmp_path / "run" / "best.keras").is_file()


def test_existing_run_dir_is_refused(tmp_path, bulk_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    proc = run_cli(["train", "--data-dir", str(bulk_dir), "--set",
                    f"train.output_dir={tmp_path}", "--set", "train.run_name=run"],
                   check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").read_text() == "name: x\n"   # untouched


def test_bad_config_is_one_clear_line(bulk_dir):
    proc = run_cli(["train", "--data-dir", str(bulk_dir), "--set", "train.epochz=1"],
                   check=False)
    assert proc.returncode == 2
    assert "unknown key 'train.epochz'" in proc.stderr and "Traceback" not in proc.stderr
