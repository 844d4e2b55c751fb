"""Shared fixtures. The real RSNA sample is found through BONEAGE_SAMPLE_DIR
(default ../shared/data/rsna-sample beside the checkout); tests fail, never skip,
when it is missing."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# caches and decode records of the shared sample go to a temporary folder, never into
# ../shared (tests that check the default location unset it)
# (made by the process that starts the tests, removed when it ends; pytest-xdist's
# workers inherit it)
if "BONEAGE_CACHE_DIR" not in os.environ:
    os.environ["BONEAGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="boneage-test-cache-")
    atexit.register(shutil.rmtree, os.environ["BONEAGE_CACHE_DIR"], True)
# pytest-xdist workers (setup.cfg: two, for this project's 2-core CI machine) share the
# cores: each worker, and the processes it starts, computes on its share of threads.
# More threads than cores, spinning against each other, slowed a training epoch here
# from 131 s to 1,142 s.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                  "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_name, _threads)

# XLA (JAX's compiler) at its lowest optimisation level in the tests: their networks are
# tiny and each process compiles its steps once, so compile time is what counts (a
# JAX training process took 22.5 s instead of 29.7 s)
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(os.environ.get("BONEAGE_SAMPLE_DIR", REPO.parent / "shared" / "data"
                                 / "rsna-sample")).resolve()


# shared fixtures that train models: every test using one (directly or through
# another fixture) runs on the same pytest-xdist worker (setup.cfg: --dist loadgroup),
# so each is built once
SHARED_TRAINING = ("trained_run", "backend_runs")


@pytest.hookimpl(tryfirst=True)          # before xdist reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in SHARED_TRAINING:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))
                break


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real RSNA sample: images/ + labels.csv (60 full-size) and bulk-100px/."""
    if not (SAMPLE_DIR / "labels.csv").is_file() or not (SAMPLE_DIR / "bulk-100px").is_dir():
        pytest.fail(f"real sample data not found at {SAMPLE_DIR}; set BONEAGE_SAMPLE_DIR")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def bulk_dir(sample_dir: Path) -> Path:
    return sample_dir / "bulk-100px"


def write_flat_dataset(root: Path, rows: list[tuple[str, object, object]],
                       size: tuple[int, int] = (40, 30)) -> Path:
    """A flat-layout data set of small synthetic gray PNGs (one per row id)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["id,boneage,male"]
    for image_id, age, male in rows:
        lines.append(f"{image_id},{age},{male}")
        pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.png")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


HIDE_MODULES = REPO / "tests" / "hide_modules"
TENSORFLOW_MODULES = ("tensorflow", "keras_cv", "tf_keras", "tensorflow_datasets", "tf2onnx")


def backend_env(backend: str, tensorflow: bool = True,
                hide: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a child process on ``backend``; ``tensorflow=False`` makes
    TensorFlow and keras-cv unimportable there, ``hide`` other top-level modules
    (tests/hide_modules/sitecustomize.py)."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    hidden = (*(() if tensorflow else TENSORFLOW_MODULES), *hide)
    if hidden:
        env["BONEAGE_TEST_HIDE"] = ",".join(hidden)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HIDE_MODULES), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_cli(args: list[str], backend: str = "torch", timeout: int = 600,
            check: bool = True, tensorflow: bool = True,
            hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` in a fresh process on the given Keras backend."""
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO,
                          env=backend_env(backend, tensorflow, hide), capture_output=True,
                          text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli.py {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


_BATCH_DRIVER = """
import json, sys, traceback
from click.testing import CliRunner
import cli
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli.cli, args, catch_exceptions=True)
    error = None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        error = "".join(traceback.format_exception(r.exception))
    results.append({"returncode": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                    "error": error})
print("@@BATCH@@" + json.dumps(results))
"""


def run_cli_batch(commands: list[list[Any]], backend: str = "torch", tensorflow: bool = True,
                  timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Run several CLI commands one after another in ONE fresh process on ``backend``
    (one interpreter and Keras start-up instead of one each). Each result has
    ``.returncode``, ``.stdout`` and ``.stderr``; a command's traceback fails loudly.
    Commands expected to fail are checked by the caller (returncode kept)."""
    import json

    proc = subprocess.run([sys.executable, "-c", _BATCH_DRIVER,
                           json.dumps([[str(a) for a in c] for c in commands])],
                          cwd=REPO, env=backend_env(backend, tensorflow), capture_output=True,
                          text=True, timeout=timeout, check=False)
    marked = [line for line in proc.stdout.splitlines() if line.startswith("@@BATCH@@")]
    assert proc.returncode == 0 and marked, proc.stderr[-5000:]
    results = []
    for command, r in zip(commands, json.loads(marked[-1][len("@@BATCH@@"):])):
        assert r["error"] is None, f"cli.py {command[0]} raised:\n{r['error']}"
        results.append(subprocess.CompletedProcess(command, r["returncode"], r["stdout"],
                                                   r["stderr"]))
    return results


def cli_here(args: list[str], check: bool = True) -> Any:
    """Run the CLI in this process (fast: no interpreter or Keras start-up), for error
    paths and small commands on the torch backend. ``.returncode``, ``.stdout``,
    ``.stderr`` as from :func:`run_cli`; exceptions other than exits propagate."""
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)
    result.returncode = result.exit_code
    if check and result.exit_code != 0:
        raise AssertionError(f"cli.py {' '.join(map(str, args))} failed "
                             f"({result.exit_code}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def run_python(code: str, backend: str = "torch", tensorflow: bool = True,
               timeout: int = 300) -> str:
    """Run ``python -c CODE`` in a fresh process; returns its stdout (fails loudly)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env=backend_env(backend, tensorflow), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


SMALL_TRAIN = ["--set", "data.max_images=96", "--set", "data.image_size=64",
               "--set", "model.backbone=resnet18", "--set", "model.width=0.25",
               "--set", "model.weights=none",
               "--set", "train.epochs=1", "--set", "train.batch_size=16"]


@pytest.fixture(scope="session")
def backend_runs(tmp_path_factory, bulk_dir) -> tuple[Path, dict[str, str]]:
    """One small run per backend (quarter-width ResNet18, 64 px, 1 epoch, the study's
    augmentation):
    torch (image only) and JAX (with the sex input) where TensorFlow cannot be imported,
    TensorFlow (with the sex input, on the PyDataset loader: TensorFlow with tf.data
    trains in test_train) where it can. ``(folder, {backend: train's log})``;
    the runs are ``folder/<backend>``. Shared by test_backends and test_export."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path_factory.mktemp("backends")

    def one(backend: str, sex: bool) -> str:
        return run_cli(["train", "--data-dir", str(bulk_dir), *SMALL_TRAIN,
                        "--set", f"model.use_sex={str(sex).lower()}",
                        "--set", "data.loader=pydataset",
                        "--set", f"train.output_dir={out}", "--set", f"train.run_name={backend}"],
                       backend=backend, tensorflow=backend == "tensorflow").stderr

    # the three at once: most of each is a single-threaded start-up (imports, building)
    runs = (("torch", False), ("jax", True), ("tensorflow", True))
    with ThreadPoolExecutor(len(runs)) as pool:
        logs = dict(zip([b for b, _ in runs], pool.map(lambda r: one(*r), runs)))
    return out, logs


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, bulk_dir) -> Path:
    """A quarter-width ResNet18 trained briefly on 2,000 real 100 px images (64 px input,
    from a prepared cache): about two minutes on one core.

    Split 80/10/10 (stratified), so it has validation and test images.
    """
    from boneage_keras.cache import prepare_cache
    from boneage_keras.config import load_config
    from boneage_keras.data import load_dataset, subsample
    from boneage_keras.train import train

    # the 2,000 images in a folder of their own (links to the real files) with a
    # prepared 64 px cache: decoding every image every epoch was a third of the time
    data = tmp_path_factory.mktemp("small2000")
    table = subsample(load_dataset(bulk_dir, check_images=False)[0], 2000, seed=42)
    (data / "images").mkdir()
    for image_id in table["id"]:
        (data / "images" / f"{image_id}.png").symlink_to(bulk_dir / "images" /
                                                         f"{image_id}.png")
    table[["id", "boneage", "male"]].to_csv(data / "labels.csv", index=False)
    prepare_cache(data, 64, "stretch", progress=False)
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"data.data_dir={data}", "data.max_images=2000", "data.image_size=64",
        "data.resize=stretch", "data.split=stratified", "data.test_fraction=0.1",
        "model.backbone=resnet18", "model.width=0.25", "model.weights=none",
        "train.epochs=6", "train.batch_size=64", "train.learning_rate=0.002",
        "train.cosine_period_epochs=null",
        # no augmentation: from scratch, a few short epochs learn clearly only without it
        # (measured: best val MAE 24.3 against the mean's 34.3; the full-width network
        # took four times as long to reach 25.8)
        "augment.horizontal_flip=false", "augment.rotation_degrees=0",
        "augment.translation=0", "augment.scale=null", "augment.brightness=0",
        "augment.contrast=null",
        f"train.output_dir={out}", "train.run_name=small"])
    return train(cfg, verbose=0).run_dir
