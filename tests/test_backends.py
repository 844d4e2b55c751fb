"""Every Keras backend, with and without TensorFlow, on real images.

torch and JAX train (conftest's ``backend_runs``), evaluate, predict, explain, bench and export in processes that
cannot import TensorFlow (tests/hide_modules); a ``.keras`` file trained on any of the
three backends predicts the same on the other two; tf.data used for input only never
takes the GPU from torch or JAX.
"""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli_batch, run_python
from conftest import SMALL_TRAIN as TRAIN

IDS = ("1437", "1440", "1472", "4360")


def test_harness_hides_tensorflow():
    out = run_python(
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('tensorflow') is None\n"
        "assert importlib.util.find_spec('keras_cv') is None\n"
        "try:\n    import tensorflow\nexcept ImportError:\n    print('blocked')\n"
        "import torch._dynamo, keras\n"
        "assert 'tensorflow' not in sys.modules\n", tensorflow=False)
    assert "blocked" in out


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_every_command_runs_without_tensorflow(backend_runs, backend, sample_dir, tmp_path):
    out, logs = backend_runs
    run = out / backend
    sex = ["--sex", "M"] if backend == "jax" else []
    assert "input: pydataset loader, augmentation numpy engine (horizontal_flip, " \
        "rotation_degrees, translation, scale, brightness, contrast)" in logs[backend]
    assert len(pd.read_csv(run / "history.csv")) == 1
    assert json.loads((run / "run.json").read_text())["backend"] == backend
    images = [str(sample_dir / "images" / f"{i}.png") for i in IDS]
    # evaluate (TTA, MC dropout by the public clone_model route), predict full-size
    # radiographs, explain, export (.keras always, ONNX natively on torch; SavedModel
    # needs TensorFlow) and bench, one after another in one process without TensorFlow
    evaluated, predicted, explained, exported, savedmodel, benched = run_cli_batch([
        ["evaluate", run, "--out", tmp_path / "eval", "--tta", "2", "--mc-samples", "3"],
        ["predict", "--model", run, *sex, *images],
        ["explain", run, *sex, *images[:2], "--out", tmp_path / "cams"],
        ["export", run, "--out", tmp_path / "deploy"],
        ["export", run, "--format", "savedmodel", "--out", tmp_path / "sm"],
        ["bench", "--data-dir", sample_dir, "--images", "16", "--steps", "1", *TRAIN],
    ], backend=backend, tensorflow=False)
    for done in (evaluated, predicted, explained, exported, benched):
        assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["tta"]["views"] == 2
    assert metrics["uncertainty"]["mean_std"] > 0          # dropout really samples
    rows = predicted.stdout.strip().splitlines()
    assert len(rows) == 1 + len(IDS) and rows[1].startswith("1437,")
    maps = np.load(tmp_path / "cams" / "heatmaps.npz")
    # not constant (a 1-epoch model's map is nearly flat: 0.93-1.0 seen, float16)
    assert set(maps.files) == {"1437", "1440"} and np.ptp(maps["1437"]) > 0.01
    assert "skipped savedmodel: the savedmodel format needs TensorFlow" in exported.stdout
    written = {p.name for p in (tmp_path / "deploy").iterdir()}
    assert written == ({"model.keras", "model.json", "model.onnx"} if backend == "torch"
                       else {"model.keras", "model.json"})
    assert savedmodel.returncode == 2
    assert 'pip install "boneage-keras[tensorflow]"' in savedmodel.stderr
    # bench: the PyDataset with the Keras and NumPy engines, and a training step
    figures = json.loads(benched.stdout)
    assert set(figures["pipeline_images_per_s"]) == {"pydataset/originals/plain",
                                                     "pydataset/originals/keras",
                                                     "pydataset/originals/numpy"}
    assert figures["train_step"]["fit_input"] == "PyDataset"


def test_every_backend_trains_on_the_same_split(backend_runs):
    """The split depends on the config and seed only (not backend, loader or sex
    input); TensorFlow's run is the PyDataset loader with the keras-cv engine."""
    out, logs = backend_runs
    splits = [pd.read_csv(out / b / "split.csv", dtype={"id": str})
              for b in ("torch", "jax", "tensorflow")]
    assert len(splits[0]) == 96 and set(splits[0]["split"]) == {"train", "val"}
    for other in splits[1:]:
        pd.testing.assert_frame_equal(other, splits[0])
    assert "input: pydataset loader, augmentation keras-cv engine" in logs["tensorflow"]


def test_keras_file_predicts_the_same_on_every_backend(backend_runs, sample_dir):
    out, _ = backend_runs
    paths = [str(sample_dir / "images" / f"{i}.png") for i in IDS]
    code = (
        "import json, numpy as np\n"
        "from boneage_keras.images import load_image\n"
        "from boneage_keras.model import load_model\n"
        f"x = np.stack([load_image(p, 64) for p in {paths!r}]).astype('float32')\n"
        "male = np.array([[1.0], [0.0], [1.0], [0.0]], 'float32')\n"
        "out = {}\n"
        "for name in ('torch', 'jax', 'tensorflow'):\n"
        f"    m = load_model(r'{out}/' + name + '/best.keras')\n"
        "    inputs = {'image': x, 'male': male} if len(m.inputs) == 2 else x\n"
        "    out[name] = m.predict(inputs, verbose=0).ravel().tolist()\n"
        "print(json.dumps(out))\n")
    results = {backend: json.loads(run_python(code, backend).strip().splitlines()[-1])
               for backend in ("torch", "jax", "tensorflow")}
    for trained_on in ("torch", "jax", "tensorflow"):
        reference = np.array(results[trained_on][trained_on])
        for backend in ("torch", "jax", "tensorflow"):
            np.testing.assert_allclose(results[backend][trained_on], reference, atol=0.01,
                                       err_msg=f"trained on {trained_on}, run on {backend}")
    # the models differ from one another (the comparison is not of constants)
    assert np.ptp([results["torch"][name][0] for name in results]) > 1e-3


def test_tensorflow_for_input_hides_the_gpu_from_tensorflow():
    """On the torch backend, tf.data for input must never see a GPU: the GPUs are
    hidden before TensorFlow's first op (and left to TensorFlow on its own backend)."""
    code = (
        "import tensorflow as tf\n"
        "calls = []\n"
        "real = tf.config.set_visible_devices\n"
        "tf.config.set_visible_devices = lambda d, t=None: (calls.append((list(d), t)),"
        " real(d, t))\n"
        "from boneage_keras.backend import tensorflow_for_input\n"
        "tensorflow_for_input()\n"
        "ds = tf.data.Dataset.range(4).map(lambda i: i * 2).batch(2)\n"
        "assert [b.numpy().tolist() for b in ds] == [[0, 2], [4, 6]]\n"
        "print(calls, tf.config.get_visible_devices('GPU'))\n")
    assert run_python(code, "torch").strip().endswith("[([], 'GPU')] []")
    assert run_python(code, "tensorflow").strip().startswith("[] ")


def test_cli_module_does_not_import_tensorflow_for_torch(tmp_path):
    """Importing the package and its CLI on torch leaves TensorFlow unloaded (a GPU
    process should not pay its start-up or memory unless tf.data is used)."""
    out = run_python("import sys, cli, boneage_keras.train, boneage_keras.evaluate, "
                     "boneage_keras.explain, boneage_keras.export, boneage_keras.bench\n"
                     "print('tensorflow' in sys.modules)", "torch")
    assert out.strip() == "False", REPO
