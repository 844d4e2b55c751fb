"""Optional dependencies: which install extra brings which module, and one clear error
when a command needs one that is missing (the ground floor: imports neither Keras nor a
backend).

    pip install "boneage-keras[torch]"      # or jax, tensorflow, export, dicom, kaggle, all
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import BoneAgeError

# top-level module -> the extra that installs it
EXTRA_OF = {
    "torch": "torch",
    "jax": "jax",
    "tensorflow": "tensorflow",
    "keras_cv": "tensorflow",
    "onnx": "export",
    "onnxruntime": "export",
    "tf2onnx": "export",
    "kagglehub": "kaggle",
    "pylibjpeg": "dicom",
    "fastapi": "serve",
    "uvicorn": "serve",
    "python_multipart": "serve",
    "prometheus_client": "serve",
}
BACKENDS = ("torch", "jax", "tensorflow")


class MissingExtra(BoneAgeError, ImportError):
    """A command needs an optional package that is not installed."""


def importable(*modules: str) -> bool:
    """Whether every module named can be imported here (without importing it)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def install_hint(*modules: str) -> str:
    """``pip install "boneage-keras[EXTRA]"`` for the extras that bring ``modules``."""
    extras = sorted({EXTRA_OF.get(m, m) for m in modules})
    return f'pip install "boneage-keras[{",".join(extras)}]"'


def require(*modules: str, purpose: str) -> None:
    """Raise :class:`MissingExtra` naming the install command unless every module of
    ``modules`` is importable."""
    absent = [m for m in modules if not importable(m)]
    if absent:
        raise MissingExtra(f"{purpose} needs {', '.join(absent)}, which is not installed "
                           f"here: {install_hint(*absent)}.")


def configured_backend() -> str:
    """The Keras backend this process will run: ``KERAS_BACKEND``, else the
    ``backend`` of ``~/.keras/keras.json`` (``$KERAS_HOME``), else Keras' default."""
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
        try:
            name = json.loads((home / "keras.json").read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    return name or "tensorflow"


def require_backend() -> str:
    """The configured backend, checked to be installed (before Keras imports it)."""
    name = configured_backend()
    if name in BACKENDS:
        require(name, purpose=f"the Keras backend {name!r} (KERAS_BACKEND={name})")
    return name
