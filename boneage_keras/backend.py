"""The Keras backend this process runs on, and TensorFlow beside it.

Which devices the backend computes on, whether it has a GPU, which mixed-precision
policy fits the hardware, and TensorFlow imported for input or export only: quietly,
and with the GPU hidden from it when the backend is torch or JAX, so it never takes GPU
memory or a CUDA context from them.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import keras

from .console import native_stderr_silenced
from .extras import importable  # noqa: F401  (re-exported for the layers above)

log = logging.getLogger(__name__)


def tensorflow_for_input() -> Any:
    """Import TensorFlow for the input pipeline (or keras-cv augmentation) only.

    When the Keras backend is not TensorFlow, every GPU is hidden from TensorFlow
    before its first op (as Flax's ImageNet example does). Its C++ start-up lines are
    not shown unless BONEAGE_VERBOSE=1.
    """
    with native_stderr_silenced():
        import tensorflow as tf

        if keras.backend.backend() != "tensorflow":
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:   # devices already initialised by an earlier TF op
                if tf.config.get_visible_devices("GPU"):
                    log.warning("TensorFlow was initialised before the input pipeline "
                                "and sees the GPU; it may hold GPU memory beside %s",
                                keras.backend.backend())
    return tf


def devices() -> list[str]:
    """The accelerators (else CPU) the active Keras backend computes on."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return [g.name for g in gpus]
    elif backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                for d in jax.devices()]
    return [f"cpu ({platform.machine()})"]


def gpu_available() -> bool:
    """Whether the active Keras backend sees a GPU."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return False


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, as
    Linux lists them in /proc/cpuinfo); elsewhere oneDNN and XLA emulate it, slower
    than float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split()))
    except OSError:
        pass
    return False


def mixed_precision_policy() -> str:
    """bfloat16 where the hardware has it (Ampere and newer GPUs; JAX everywhere; any
    CPU, since CPU matrix units such as AMX multiply bfloat16: no loss scaling needed),
    else float16 with Keras' automatic loss scaling (older GPUs)."""
    if not gpu_available():
        return "mixed_bfloat16"
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_bf16_supported():
            return "mixed_bfloat16"
    elif backend == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            if tf.config.experimental.get_device_details(gpu).get(
                    "compute_capability", (0, 0)) >= (8, 0):
                return "mixed_bfloat16"
    elif backend == "jax":
        return "mixed_bfloat16"
    return "mixed_float16"
