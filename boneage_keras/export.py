"""Deployment files from a trained model: ``.keras``, ONNX, TensorFlow SavedModel.

    >>> export_model("runs/x", ["all"], "deploy/x")
    deploy/x/model.keras  model.json  model.onnx  savedmodel/

* ``keras``: the model without optimizer state; no TensorFlow needed.
* ``onnx`` (the preprocessed signature, dynamic batch; input ``image`` [, ``male``],
  output ``boneage``): on the torch backend through Keras' own
  ``model.export(format="onnx")`` (torch.onnx), no TensorFlow needed; on TensorFlow
  through tf2onnx; on JAX through a TensorFlow child process where TensorFlow is
  installed (Keras' JAX route needs jax2onnx).
* ``savedmodel`` needs TensorFlow: from another backend the backend-agnostic
  ``.keras`` file is loaded in a child process with ``KERAS_BACKEND=tensorflow`` and
  exported there (Keras' own torch->SavedModel route needs torch_xla).
* ``all``: every format this machine can write; what it cannot is named and skipped.
* ``triton`` (only when asked for): a Triton model repository ``triton/boneage/``
  (``config.pbtxt`` for the onnxruntime backend with dynamic batching, ``1/model.onnx``).

SavedModel signatures (see docs/export.md):
  serving_default  images uint8 [batch, height, width, 1] (any size; padding/resizing
                   and normalisation are in the graph) [, male float32 [batch, 1]]
                   -> boneage float32 [batch, 1] (months)
  preprocessed     image float32 [batch, S, S, 1] (0-255, already resized)
                   [, male float32 [batch, 1]] -> boneage float32 [batch, 1]

Everything is first written to a hidden folder next to the output and renamed into
place at the end: a failed export leaves nothing behind. ``overwrite`` replaces only
a folder this command wrote before (its model.json says so), never a run directory,
one of its parents or the current directory, and nothing that is not an export file.
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

from .backend import onnx_modules, onnx_through_tensorflow, tensorflow_is_backend
from .errors import BoneAgeError
from .extras import install_hint
from .inputs import IMAGE, SEX, model_inputs

FORMATS = ("keras", "savedmodel", "onnx")
EXTRA_FORMATS = ("triton",)       # written when asked for, not by "all"
TRITON_NAME = "boneage"
TRITON_MAX_BATCH = 32


class ExportError(BoneAgeError, ValueError):
    """The export cannot be done as asked; the message says why and what to do."""


def _formats(requested: Iterable[str]) -> list[str]:
    wanted: list[str] = []
    for name in requested:
        name = name.lower()
        if name == "all":
            return list(FORMATS)
        if name not in FORMATS + EXTRA_FORMATS:
            raise ExportError(f"unknown export format {name!r}; choose from "
                              + ", ".join(FORMATS + EXTRA_FORMATS) + " or all.")
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
                              "`boneage train` or a .keras file.")
        return path / "best.keras", path
    if path.suffix != ".keras" or not path.is_file():
        raise ExportError(f"model not found or not a .keras file: {path}.")
    return path, None


def _metadata(model_path: Path, run_dir: Path | None, formats: list[str]) -> dict[str, Any]:
    from .inference import open_model
    from .model import preprocessing_of

    model = open_model(model_path)
    pre = preprocessing_of(model)
    meta: dict[str, Any] = {
        "source": str(model_path), "formats": formats, "output": "boneage (months)",
        "image_size": pre["image_size"], "channels": 1, "use_sex": pre["use_sex"],
        "preprocessing": {"resize": pre["resize"], "crop_hand": pre["crop_hand"],
                          "random_crop": pre["random_crop"],
                          "pixel_range": [0, 255],
                          "normalisation": model.get_layer("preprocess").mode,
                          "per_image_standardization": model.get_layer(
                              "preprocess").standardize},
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
        if (run_dir / "calibration.json").is_file():
            meta["calibration"] = json.loads((run_dir / "calibration.json").read_text())
        if (run_dir / "metrics.json").is_file():
            metrics = json.loads((run_dir / "metrics.json").read_text())
            meta["metrics"] = {k: metrics[k] for k in ("mae", "rmse", "r2", "bias",
                                                       "tolerance_accuracy", "n")
                               if k in metrics}
    return meta


EXPORT_MARK = "boneage-keras export"
EXPORT_FILES = ("model.keras", "model.onnx", "model.json", "savedmodel", "triton")


def _available(wanted_all: bool, formats: list[str]) -> tuple[list[str], dict[str, str]]:
    """The formats this machine can write, and why each other one cannot."""
    import importlib.util

    missing: dict[str, str] = {}
    has_tf = importlib.util.find_spec("tensorflow") is not None
    if "savedmodel" in formats and not has_tf:
        missing["savedmodel"] = ("the savedmodel format needs TensorFlow, which is not "
                                 f"installed here: {install_hint('tensorflow')} (the "
                                 "keras and onnx formats need no TensorFlow)")
    if "onnx" in formats or "triton" in formats:
        absent = [m for m in onnx_modules() if importlib.util.find_spec(m) is None]
        if onnx_through_tensorflow() and not has_tf:
            missing["onnx"] = ("ONNX (and Triton's repository) from the JAX backend is "
                               "written through TensorFlow (tf2onnx), which is not "
                               "installed here: "
                               f"{install_hint('tensorflow', 'tf2onnx')}, or export with "
                               "KERAS_BACKEND=torch")
        elif absent:
            missing["onnx"] = (f"the onnx format needs {', '.join(absent)}: "
                               f"{install_hint(*absent)}")
    if missing and not wanted_all:
        raise ExportError("; ".join(missing.values()) + ".")
    return [f for f in formats if f not in missing], missing


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse outputs whose replacement could delete what this command did not write."""
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(f"output {out} already exists; choose another --out or pass "
                          "--overwrite (which replaces a folder written by export only).")
    resolved = out.resolve()
    run_dir = source.resolve() if source.is_dir() else source.resolve().parent
    if resolved == Path.cwd().resolve() or resolved in (run_dir, *run_dir.parents):
        raise ExportError(f"--out {out} is the current directory, the run directory or one "
                          "of its parents; --overwrite never replaces those. Choose a new "
                          "folder, e.g. --out deploy/NAME.")
    meta = resolved / "model.json"
    try:
        written_by = json.loads(meta.read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        written_by = None
    if not resolved.is_dir() or written_by != EXPORT_MARK:
        raise ExportError(f"--out {out} exists and was not written by `boneage export` (no "
                          "model.json of an export in it); --overwrite replaces only "
                          "earlier exports. Choose another --out.")
    strangers = sorted(p.name for p in resolved.iterdir() if p.name not in EXPORT_FILES)
    if strangers:
        raise ExportError(f"--out {out} holds files export did not write ("
                          + ", ".join(strangers[:5]) + "); move them away or choose "
                          "another --out: --overwrite deletes only export files.")


def export_model(source: str | Path, formats: Iterable[str], out_dir: str | Path,
                 overwrite: bool = False) -> dict[str, Any]:
    """Export a run directory or ``.keras`` file; returns model.json's content (its
    ``skipped`` names formats that ``all`` left out here, and why)."""
    requested = [f.lower() for f in formats]
    wanted = _formats(requested)
    wanted, skipped = _available("all" in requested, wanted)
    model_path, run_dir = _source(source)
    out = Path(out_dir)
    _check_out(out, Path(source), overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as err:
        raise ExportError(f"cannot write --out {out} ({err.strerror}); choose a writable "
                          "folder.") from None
    try:
        meta = _metadata(model_path, run_dir, wanted)
        if "savedmodel" in wanted and meta["preprocessing"]["resize"].startswith("hand+"):
            reason = ("this model crops each radiograph to the hand (data.crop_hand), which "
                      "the SavedModel's raw-image signature cannot do in the graph; export "
                      "--format keras or onnx (they take the prepared image, as `predict` "
                      "makes it)")
            if "all" not in requested:
                raise ExportError(reason + ".")
            wanted.remove("savedmodel")
            skipped["savedmodel"] = reason
            meta["formats"] = wanted
        meta["written_by"] = EXPORT_MARK
        if skipped:
            meta["skipped"] = skipped
        if "keras" in wanted:
            _save_inference_keras(model_path, partial / "model.keras")
        if "onnx" in wanted or "triton" in wanted:
            write_onnx(model_path, partial)
        if "triton" in wanted:
            write_triton(partial / "model.onnx", partial / "triton")
            if "onnx" not in wanted:
                (partial / "model.onnx").unlink()
        if "savedmodel" in wanted:
            _export_tf_formats(model_path, partial, ["savedmodel"])
        (partial / "model.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            partial.rename(out)
            for name in EXPORT_FILES:
                target = old / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            old.rmdir()
        else:
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


def write_onnx(model_path: Path, out: Path) -> None:
    """``out/model.onnx`` through Keras' own ``model.export(format="onnx")`` on the torch
    and TensorFlow backends; from JAX, in a TensorFlow child process."""
    if onnx_through_tensorflow():
        _export_tf_formats(model_path, out, ["onnx"])
    else:
        keras_onnx(model_path, out / "model.onnx")


def keras_onnx(model_path: Path, target: Path) -> None:
    """ONNX of the preprocessed signature (dynamic batch), output renamed ``boneage``."""
    import warnings

    import keras
    import onnx

    from .model import load_model, preprocessing_of

    model = load_model(str(model_path))
    pre = preprocessing_of(model)
    size = pre["image_size"]
    image = keras.InputSpec(shape=(None, size, size, 1), dtype="float32", name=IMAGE)
    male = keras.InputSpec(shape=(None, 1), dtype="float32", name=SEX)
    signature = [model_inputs(image, male, pre["use_sex"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(target), format="onnx", input_signature=signature,
                     verbose=False, opset_version=17)
    proto = onnx.load(str(target))
    _rename_output(proto, "boneage")
    onnx.save(proto, str(target))


def _export_tf_formats(model_path: Path, out: Path, formats: list[str]) -> None:
    if tensorflow_is_backend():
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
    if "onnx" in formats:
        keras_onnx(model_path, out / "model.onnx")
    if "savedmodel" not in formats:
        return
    import keras
    import tensorflow as tf

    from .images import CROP_FRACTION, decode_size
    from .model import load_model, preprocessing_of

    model = load_model(str(model_path))
    pre = preprocessing_of(model)
    size, use_sex = pre["image_size"], pre["use_sex"]
    side = decode_size(size, pre["random_crop"])

    def prepare(images):
        x = tf.cast(images, tf.float32)
        if pre["resize"] == "pad":
            x = tf.image.resize_with_pad(x, side, side, antialias=True)
        else:
            x = tf.image.resize(x, (side, side), antialias=True)
        if pre["random_crop"]:   # the central window, as in evaluation
            x = tf.image.central_crop(x, CROP_FRACTION)
            x = tf.image.resize(x, (size, size))
        return tf.round(tf.clip_by_value(x, 0.0, 255.0))

    image_spec = tf.TensorSpec([None, size, size, 1], tf.float32, name=IMAGE)
    raw_spec = tf.TensorSpec([None, None, None, 1], tf.uint8, name="images")
    male_spec = tf.TensorSpec([None, 1], tf.float32, name=SEX)

    def run(x, male=None):
        return {"boneage": model(model_inputs(x, male, use_sex), training=False)}

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


TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 2: "TYPE_UINT8"}


def triton_config(onnx_path: Path, name: str = TRITON_NAME,
                  max_batch_size: int = TRITON_MAX_BATCH) -> str:
    """Triton's ``config.pbtxt`` for an ONNX model with a dynamic first (batch) axis:
    the onnxruntime backend, the graph's inputs and output without the batch axis, and
    dynamic batching."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def tensors(values: Any) -> str:
        entries = []
        for value in values:
            kind = value.type.tensor_type
            dims = [d.dim_value for d in kind.shape.dim][1:]
            entries.append(f'  {{\n    name: "{value.name}"\n    data_type: '
                           f"{TRITON_TYPES[kind.elem_type]}\n    dims: "
                           f"[ {', '.join(str(d) for d in dims)} ]\n  }}")
        return ",\n".join(entries)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\n'
            f"max_batch_size: {max_batch_size}\n"
            f"input [\n{tensors(graph.input)}\n]\n"
            f"output [\n{tensors(graph.output)}\n]\n"
            "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n")


def write_triton(onnx_path: Path, repository: Path) -> None:
    """A Triton model repository: ``boneage/config.pbtxt`` + ``boneage/1/model.onnx``."""
    version = repository / TRITON_NAME / "1"
    version.mkdir(parents=True)
    shutil.copyfile(onnx_path, version / "model.onnx")
    (repository / TRITON_NAME / "config.pbtxt").write_text(triton_config(onnx_path))


def _rename_output(proto: Any, name: str) -> None:
    """Give the ONNX graph's single output a readable name (the exporters number it)."""
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    proto.graph.output[0].name = name


if __name__ == "__main__":  # child process of _export_tf_formats
    write_tf_formats(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
