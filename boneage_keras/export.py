"""Deployment files from a trained model: ``.keras``, TensorFlow SavedModel, ONNX.

    >>> export_model("runs/x", ["all"], "deploy/x")
    deploy/x/model.keras  model.json  savedmodel/  model.onnx

The SavedModel and ONNX files are written under the TensorFlow backend. From another
backend (torch), the backend-agnostic ``.keras`` file is loaded in a child process
with ``KERAS_BACKEND=tensorflow`` and exported there, so one command works everywhere
(Keras' own torch->SavedModel route needs torch_xla).

SavedModel signatures (see the README):
  serving_default  images uint8 [batch, height, width, 1] (any size; padding/resizing
                   and normalisation are in the graph) [, male float32 [batch, 1]]
                   -> boneage float32 [batch, 1] (months)
  preprocessed     image float32 [batch, S, S, 1] (0-255, already resized)
                   [, male float32 [batch, 1]] -> boneage float32 [batch, 1]
ONNX: the preprocessed signature, dynamic batch.
Everything is first written to a hidden folder next to the output and renamed into
place at the end: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FORMATS = ("keras", "savedmodel", "onnx")


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why and what to do."""


def _formats(requested: Iterable[str]) -> list[str]:
    wanted: list[str] = []
    for name in requested:
        name = name.lower()
        if name == "all":
            return list(FORMATS)
        if name not in FORMATS:
            raise ExportError(f"unknown export format {name!r}; choose from "
                              + ", ".join(FORMATS) + " or all.")
        if name not in wanted:
            wanted.append(name)
    if not wanted:
        raise ExportError("no export format given; choose from keras, savedmodel, onnx, all.")
    return wanted


def _source(source: str | Path) -> tuple[Path, Path | None]:
    path = Path(source)
    if path.is_dir():
        if not (path / "best.keras").is_file():
            raise ExportError(f"{path} holds no best.keras; pass a run directory written by "
                              "`cli.py train` or a .keras file.")
        return path / "best.keras", path
    if path.suffix != ".keras" or not path.is_file():
        raise ExportError(f"model not found or not a .keras file: {path}.")
    return path, None


def _metadata(model_path: Path, run_dir: Path | None, formats: list[str]) -> dict[str, Any]:
    from .evaluate import open_model
    from .model import preprocessing_of

    model = open_model(model_path)
    pre = preprocessing_of(model)
    meta: dict[str, Any] = {
        "source": str(model_path), "formats": formats, "output": "boneage (months)",
        "input_size": pre["image_size"], "channels": 1, "use_sex": pre["use_sex"],
        "preprocessing": {"resize": pre["resize"], "center_crop": pre["crop"],
                          "pixel_range": [0, 255],
                          "normalisation": model.get_layer("preprocess").mode},
        "backbone": next((layer.name for layer in model.layers
                          if hasattr(layer, "layers") and layer.name != model.name), None),
    }
    if run_dir is not None:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        meta["training"] = {k: cfg["train"].get(k) for k in
                            ("epochs", "batch_size", "optimizer", "learning_rate", "loss",
                             "seed")}
        meta["training"]["weights"] = cfg["model"].get("weights")
        if (run_dir / "metrics.json").is_file():
            metrics = json.loads((run_dir / "metrics.json").read_text())
            meta["metrics"] = {k: metrics[k] for k in ("mae", "rmse", "r2", "bias",
                                                       "tolerance_accuracy", "n")
                               if k in metrics}
    return meta


def export_model(source: str | Path, formats: Iterable[str], out_dir: str | Path,
                 overwrite: bool = False) -> dict[str, Any]:
    """Export a run directory or ``.keras`` file; returns model.json's content."""
    wanted = _formats(formats)
    model_path, run_dir = _source(source)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists; choose another --out or pass "
                          "--overwrite.")
    if "onnx" in wanted:
        _require("onnxruntime", "onnx")
        _require("tf2onnx", "onnx")
    meta = _metadata(model_path, run_dir, wanted)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if "keras" in wanted:
            _save_inference_keras(model_path, partial / "model.keras")
        tf_formats = [f for f in wanted if f != "keras"]
        if tf_formats:
            _export_tf_formats(model_path, partial, tf_formats)
        (partial / "model.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


def _save_inference_keras(model_path: Path, target: Path) -> None:
    """The model without optimizer state (a third of a training checkpoint's size)."""
    import keras

    from . import metrics  # noqa: F401  registers ToleranceAccuracy

    keras.saving.load_model(str(model_path), compile=False).save(str(target))


def _require(module: str, fmt: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExportError(f"the {fmt} export needs the '{module}' package, which is not "
                          f"installed: pip install 'boneage-keras[export]' (or {module}).")


def _export_tf_formats(model_path: Path, out: Path, formats: list[str]) -> None:
    import keras

    if keras.backend.backend() == "tensorflow":
        write_tf_formats(model_path, out, formats)
        return
    env = {**os.environ, "KERAS_BACKEND": "tensorflow",
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    proc = subprocess.run([sys.executable, "-m", "boneage_keras.export", str(model_path),
                           str(out), *formats], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise ExportError(f"export under the TensorFlow backend failed:\n"
                          f"{proc.stderr[-3000:]}")


def write_tf_formats(model_path: Path, out: Path, formats: list[str]) -> None:
    """SavedModel and/or ONNX of a ``.keras`` file; needs KERAS_BACKEND=tensorflow."""
    import keras
    import tensorflow as tf

    from .images import CROP_FRACTION, decode_size
    from .model import load_model, preprocessing_of

    model = load_model(str(model_path))
    pre = preprocessing_of(model)
    size, use_sex = pre["image_size"], pre["use_sex"]
    side = decode_size(size, pre["crop"])

    def prepare(images):
        x = tf.cast(images, tf.float32)
        if pre["resize"] == "pad":
            x = tf.image.resize_with_pad(x, side, side, antialias=True)
        else:
            x = tf.image.resize(x, (side, side), antialias=True)
        if pre["crop"]:
            x = tf.image.central_crop(x, CROP_FRACTION)
            x = tf.image.resize(x, (size, size))
        return tf.round(tf.clip_by_value(x, 0.0, 255.0))

    image_spec = tf.TensorSpec([None, size, size, 1], tf.float32, name="image")
    raw_spec = tf.TensorSpec([None, None, None, 1], tf.uint8, name="images")
    male_spec = tf.TensorSpec([None, 1], tf.float32, name="male")

    def run(x, male=None):
        inputs = {"image": x, "male": male} if use_sex else x
        return {"boneage": model(inputs, training=False)}

    if "savedmodel" in formats:
        archive = keras.export.ExportArchive()
        archive.track(model)
        if use_sex:
            archive.add_endpoint("serving_default", lambda images, male: run(prepare(images),
                                                                             male),
                                 input_signature=[raw_spec, male_spec])
            archive.add_endpoint("preprocessed", lambda image, male: run(image, male),
                                 input_signature=[image_spec, male_spec])
        else:
            archive.add_endpoint("serving_default", lambda images: run(prepare(images)),
                                 input_signature=[raw_spec])
            archive.add_endpoint("preprocessed", lambda image: run(image),
                                 input_signature=[image_spec])
        archive.write_out(str(out / "savedmodel"), verbose=False)
    if "onnx" in formats:
        import tf2onnx
        from keras.src.export.tf2onnx_lib import patch_tf2onnx

        patch_tf2onnx()
        specs = [image_spec, male_spec] if use_sex else [image_spec]
        fn = tf.function(lambda *args: run(*args)["boneage"], input_signature=specs)
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=17)
        _rename_output(proto, "boneage")
        (out / "model.onnx").write_bytes(proto.SerializeToString())


def _rename_output(proto: Any, name: str) -> None:
    """Give the ONNX graph's single output a readable name (tf2onnx: 'Identity:0')."""
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    proto.graph.output[0].name = name


if __name__ == "__main__":  # child process of _export_tf_formats
    write_tf_formats(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
