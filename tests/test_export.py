"""Export to .keras / SavedModel / ONNX from models trained on each backend, and parity:
every deployment format predicts the same months (within 0.01) on real images."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_here

from boneage_keras.export import ExportError, export_model
from boneage_keras.inference import ModelFileError

IDS = ("1378", "1379", "1380", "1381", "1382", "1383")


@pytest.fixture(scope="module", params=[("torch", False), ("tensorflow", True)],
                ids=["torch", "tensorflow-sex"])
def exported(request, tmp_path_factory, backend_runs):
    """A copy of conftest's small run of the given backend (64 px; the TensorFlow one
    takes the patient's sex as a second input), exported (all formats) via the CLI under
    the torch backend, so the TF-trained one crosses backends too."""
    backend, _ = request.param
    root = tmp_path_factory.mktemp(f"export-{backend}")
    shutil.copytree(backend_runs[0] / backend, root / "run",
                    ignore=shutil.ignore_patterns("backup"))
    cli_here(["export", str(root / "run"), "--format", "all", "--out", str(root / "deploy")])
    return root


def _in_fresh_process(code: str, backend: str = "tensorflow") -> np.ndarray:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, text=True,
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.array(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_all_formats_agree(exported, bulk_dir, sample_dir):
    deploy = exported / "deploy"
    assert {p.name for p in deploy.iterdir()} == {"model.keras", "savedmodel", "model.onnx",
                                                  "model.json"}
    meta = json.loads((deploy / "model.json").read_text())
    use_sex = meta["use_sex"]
    assert meta["image_size"] == 64 and meta["channels"] == 1
    assert meta["preprocessing"]["resize"] == "pad" and meta["training"]["epochs"] == 1
    paths = [str(bulk_dir / "images" / f"{i}.png") for i in IDS]
    male = np.ones((len(paths), 1), "float32")      # all male: what --sex M gives
    np.save(exported / "male.npy", male)
    inputs = "{'image': x, 'male': np.load(r'%s')}" % (exported / "male.npy") if use_sex \
        else "x"
    load = ("import json, numpy as np; from boneage_keras.images import load_image;"
            f"x = np.stack([load_image(p, 64) for p in {paths!r}]).astype('float32');")
    keras_code = load + ("from boneage_keras.model import load_model;"
                         f"m = load_model(r'{deploy / 'model.keras'}');"
                         f"print(json.dumps(m.predict({inputs}, verbose=0).ravel().tolist()))")
    from boneage_keras.images import load_image
    from boneage_keras.model import load_model

    x64 = np.stack([load_image(p, 64) for p in paths]).astype("float32")
    model = load_model(deploy / "model.keras")                       # this process: torch
    under_torch = model.predict({"image": x64, "male": male} if use_sex else x64,
                                verbose=0).ravel()
    under_tf = _in_fresh_process(keras_code, "tensorflow")
    # plain TensorFlow, no boneage_keras import: float and raw uint8 signatures
    from PIL import Image

    pixels = [np.asarray(Image.open(p)) for p in paths]
    x = np.stack([np.asarray(Image.fromarray(a).resize((64, 64), Image.BILINEAR))
                  for a in pixels])[..., None].astype("float32")
    np.save(exported / "x.npy", x)
    np.save(exported / "raw.npy", np.stack(pixels)[..., None])
    sex = f", male=tf.constant(np.load(r'{exported / 'male.npy'}'))" if use_sex else ""
    saved = _in_fresh_process(
        "import json, sys, numpy as np, tensorflow as tf;"
        f"sm = tf.saved_model.load(r'{deploy / 'savedmodel'}');"
        "assert 'boneage_keras' not in sys.modules;"
        f"x = np.load(r'{exported / 'x.npy'}'); raw = np.load(r'{exported / 'raw.npy'}');"
        f"a = sm.signatures['preprocessed'](image=tf.constant(x){sex})['boneage'];"
        f"b = sm.signatures['serving_default'](images=tf.constant(raw){sex})['boneage'];"
        "print(json.dumps([a.numpy().ravel().tolist(), b.numpy().ravel().tolist()]))")
    import onnxruntime

    runtime = onnxruntime.InferenceSession(str(deploy / "model.onnx"))
    assert runtime.get_outputs()[0].name == "boneage"
    names = [i.name for i in runtime.get_inputs()]
    assert len(names) == (2 if use_sex else 1)
    feeds = {names[0]: x, **({names[1]: male} if use_sex else {})}
    onnx_out = runtime.run(None, feeds)[0].ravel()
    # the 100 px images are square, so pad == stretch and PIL's resize is our pipeline
    np.testing.assert_allclose(under_tf, under_torch, atol=0.01)
    np.testing.assert_allclose(saved[0], under_torch, atol=0.01)
    np.testing.assert_allclose(onnx_out, under_torch, atol=0.01)
    # the raw signature resizes inside the graph (TF's antialiased bilinear, not PIL's)
    np.testing.assert_allclose(saved[1], under_torch, atol=1.0)
    if use_sex:   # the second input is used: female changes the prediction
        female = runtime.run(None, {names[0]: x, names[1]: 0 * male})[0].ravel()
        assert np.abs(female - onnx_out).max() > 1e-4
    # predict accepts the SavedModel folder and the ONNX file (--sex for this model)
    sex_args = ["--sex", "M"] if use_sex else []
    for model in (deploy / "savedmodel", deploy / "model.onnx"):
        out = exported / f"{model.name}.csv"
        cli_here(["predict", "--model", str(model), "--output", str(out), *sex_args, *paths])
        predicted = np.loadtxt(out, delimiter=",", skiprows=1,
                               usecols=2 if use_sex else 1)
        np.testing.assert_allclose(predicted, under_torch, atol=0.01)
    if not use_sex:   # a model without the sex input ignores --sex
        out = exported / "ignored.csv"
        cli_here(["predict", "--model", str(deploy / "model.onnx"), "--output", str(out),
                  "--sex", "F", *paths])
        ignored = np.loadtxt(out, delimiter=",", skiprows=1, usecols=1)
        np.testing.assert_allclose(ignored, under_torch, atol=0.01)
    if use_sex:   # no sex given to a model that needs it: a clear error, no default
        proc = cli_here(["predict", "--model", str(deploy / "model.onnx"), paths[0]],
                       check=False)
        assert proc.returncode == 2 and "needs the patient's sex" in proc.stderr
    if not use_sex:
        return
    # evaluate (the labels' male column feeds the sex input) and compare, on the 60
    # full-size radiographs: .keras and ONNX give the same metrics
    for model, name in ((deploy / "model.keras", "keras"), (deploy / "model.onnx", "onnx")):
        cli_here(["evaluate", "--model", str(model), "--data-dir", str(sample_dir),
                  "--out", str(exported / f"eval-{name}")])
    metrics = json.loads((exported / "eval-onnx" / "metrics.json").read_text())
    assert metrics["n"] == 60
    proc = cli_here(["compare", str(exported / "eval-keras"), str(exported / "eval-onnx")])
    assert "n=60" in proc.stdout
    assert abs(float(proc.stdout.split("B-A=")[1].split()[0])) < 0.01


def test_export_refuses_and_cleans_up(exported, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_model(exported / "run", ["keras"], exported / "deploy")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(exported / "run", ["tflite"], tmp_path / "x")
    (tmp_path / "fake.keras").write_text("not a model")
    with pytest.raises(ModelFileError, match="fake.keras is not a Keras model file"):
        export_model(tmp_path / "fake.keras", ["keras"], tmp_path / "out")
    # a failure after files were written into the hidden folder leaves nothing behind
    import boneage_keras.export as export_module

    def half_written(model_path, target):
        target.write_bytes(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_save_inference_keras", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_model(exported / "run", ["keras"], tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fake.keras"]    # no .out.partial-*
    # an earlier export (a copy: other tests read the fixture's) is replaced whole
    shutil.copytree(exported / "deploy", tmp_path / "deploy")
    meta = export_model(exported / "run", ["keras"], tmp_path / "deploy", overwrite=True)
    assert meta["formats"] == ["keras"]
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["model.json",
                                                                         "model.keras"]


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_replaces_only_an_earlier_export(exported, tmp_path, monkeypatch):
    run = exported / "run"
    before = _tree(run)
    # the run directory itself, its parent and the current directory are never replaced
    for target in (run, exported):
        with pytest.raises(ExportError, match="never replaces"):
            export_model(run, ["keras"], target, overwrite=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="current directory"):
        export_model(run, ["keras"], ".", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert _tree(run) == before
    # a folder export did not write is refused, and left as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    with pytest.raises(ExportError, match="not written by `boneage export`"):
        export_model(run, ["keras"], mine, overwrite=True)
    assert (mine / "thesis.docx").read_text() == "years of work"
    # an earlier export is replaced; one holding other files too is refused
    export_model(run, ["keras"], tmp_path / "deploy")
    (tmp_path / "deploy" / "readme.txt").write_text("added by hand")
    with pytest.raises(ExportError, match="holds files export did not write.*readme.txt"):
        export_model(run, ["keras"], tmp_path / "deploy", overwrite=True)
    (tmp_path / "deploy" / "readme.txt").unlink()
    first = (tmp_path / "deploy" / "model.keras").stat().st_mtime_ns
    proc = cli_here(["export", str(run), "--format", "keras", "--out",
                    str(tmp_path / "deploy"), "--overwrite"])
    assert "exported keras" in proc.stdout
    assert (tmp_path / "deploy" / "model.keras").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "mine", "notes.txt"]


def test_damaged_exports_are_clear_errors(exported, tmp_path, sample_dir):
    """A corrupt .onnx, a corrupt saved_model.pb and a model.json from another export
    each stop predict with one line naming the file, never a traceback."""
    deploy = tmp_path / "deploy"
    shutil.copytree(exported / "deploy", deploy)
    image = str(sample_dir / "images" / "1437.png")
    sex = ["--sex", "M"]
    meta = json.loads((deploy / "model.json").read_text())
    meta["image_size"] = 96                                  # as if from another export
    (deploy / "model.json").write_text(json.dumps(meta))
    proc = cli_here(["predict", "--model", deploy / "model.onnx", *sex, image], check=False)
    assert proc.returncode == 2 and "says image_size 96" in proc.stderr
    (deploy / "model.onnx").write_bytes(b"\x08\x07garbage" * 50)
    proc = cli_here(["predict", "--model", deploy / "model.onnx", *sex, image], check=False)
    assert proc.returncode == 2 and "is not a readable ONNX model" in proc.stderr
    (deploy / "savedmodel" / "saved_model.pb").write_bytes(b"\x00\x01broken")
    proc = cli_here(["predict", "--model", deploy / "savedmodel", *sex, image], check=False)
    assert proc.returncode == 2 and "cannot be loaded as a SavedModel" in proc.stderr


def test_unwritable_outputs_are_refused_before_any_work(exported, tmp_path, sample_dir):
    """An output folder that cannot be made (its parent is a file: even root cannot
    write there) is refused up front, with the flag named."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    model = exported / "deploy" / "model.keras"
    for command in (["evaluate", "--model", model, "--data-dir", sample_dir,
                     "--out", blocker / "eval"],
                    ["explain", model, sample_dir / "images" / "1437.png", "--sex", "M",
                     "--out", blocker / "cams"],
                    ["export", exported / "run", "--format", "keras",
                     "--out", blocker / "deploy"]):
        proc = cli_here(command, check=False)
        assert proc.returncode == 2, (command[0], proc.stderr)
        assert "--out" in proc.stderr and "Traceback" not in proc.stderr, command[0]
    assert blocker.read_text() == "a file"
