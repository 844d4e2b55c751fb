"""The Keras backend this process runs on, and TensorFlow beside it.

Everything that differs per backend lives here: which devices it computes on, whether
it has a GPU, which mixed-precision policy fits the hardware, compiled steps, gradients
(Grad-CAM), no-grad blocks, fused batch normalization on torch, synchronisation and
peak memory (bench), where ONNX comes from, and every private Keras attribute the
package touches (each in one function, with a test that fails when Keras changes it).
TensorFlow is imported for input or export only: quietly, and with the GPU hidden
from it when the backend is torch or JAX, so it never takes GPU memory or a CUDA
context from them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
from collections.abc import Callable, Iterator
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
        tf.config.list_physical_devices()   # its device search runs here, quietly
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


def jit_setting(jit_compile: bool | None) -> bool | str:
    """``train.jit_compile`` null: always on JAX (its eager mode is op-by-op), and on a
    GPU for torch (torch.compile) and TensorFlow (XLA); on a CPU compiling a ResNet costs
    more than it saves (experiments/2026-11-22-input-pipeline-speed.md)."""
    if jit_compile is not None:
        return jit_compile
    if keras.backend.backend() == "jax":
        return True
    return "auto" if gpu_available() else False


def no_grad() -> Any:
    """A context in which the backend records no gradients (torch's autograd tape; the
    other backends record none outside their gradient calls)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def value_and_gradient(fn: Callable[[Any], Any], x: Any) -> tuple[Any, Any]:
    """``fn(x)`` and the gradient of ``sum(fn(x))`` with respect to the tensor ``x``:
    Keras 3 has no backend-neutral gradient call."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
            total = tf.reduce_sum(y)   # inside the tape, or it is not recorded
        return y, tape.gradient(total, x)
    if backend == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = fn(x)
            (grad,) = torch.autograd.grad(y.sum(), x)
        return y.detach(), grad
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        y, pullback = jax.vjp(fn, x)
        return y, pullback(jnp.ones_like(y))[0]
    raise RuntimeError(f"gradients are not implemented for the {backend} backend; use "
                       "KERAS_BACKEND=torch, jax or tensorflow.")


def synchronize() -> None:
    """Wait for the accelerator's queued work (torch on CUDA runs asynchronously), so a
    timer around it measures the work."""
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def peak_accelerator_memory_mb() -> float | None:
    """The most accelerator memory the backend has held in this process (torch on CUDA,
    JAX on a device that reports it), else None."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    elif backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    return None


def backend_version() -> str:
    """The version of the active backend's package (torch, jax, tensorflow)."""
    import importlib

    backend = keras.backend.backend()
    if backend not in ("torch", "tensorflow", "jax"):
        return "?"
    return getattr(importlib.import_module(backend), "__version__", "?")


def tensorflow_is_backend() -> bool:
    """Whether TensorFlow formats (SavedModel) can be written in this process."""
    return keras.backend.backend() == "tensorflow"


def onnx_through_tensorflow() -> bool:
    """Whether Keras writes ONNX only through TensorFlow here (from JAX: a TensorFlow
    child process re-loads the model); torch and TensorFlow export it themselves."""
    return keras.backend.backend() == "jax"


def onnx_modules() -> list[str]:
    """What writing ONNX needs on this backend: Keras' exporter goes through torch.onnx
    on torch, through tf2onnx elsewhere; onnxruntime checks the file."""
    extra = [] if keras.backend.backend() == "torch" else ["tf2onnx"]
    return ["onnx", "onnxruntime", *extra]


def _compiling() -> bool:
    """Whether torch.compile is tracing the calling code."""
    import torch

    return torch.compiler.is_compiling()


@functools.lru_cache(maxsize=64)
def _scalar(value: float, device: Any) -> Any:
    """A 0-d float32 tensor of ``value`` on ``device``, made once."""
    import torch

    return torch.tensor(value, dtype=torch.float32, device=device)


def fused_batch_norm(layer: Any, inputs: Any, training: bool | None) -> Any | None:
    """Keras' ``BatchNormalization`` of a channels-last 4-D input as one fused op per
    direction on torch (``native_batch_norm`` and its backward; Keras spells it out in
    about forty elementwise ops and reductions): the same output, gradients and
    moving-statistics update (Keras' momentum, biased batch variance), in float32 as
    Keras computes it. None where it does not apply (another backend, another axis or
    rank, renorm, synchronized): the caller computes it as Keras does.
    experiments/2026-12-05-step-ops.md counts the ops."""
    if (keras.backend.backend() != "torch" or len(inputs.shape) != 4
            or layer.axis not in (-1, 3) or layer.renorm or layer.synchronized):
        return None
    import torch

    x = inputs if inputs.dtype == torch.float32 else inputs.float()
    x = x.permute(0, 3, 1, 2)                 # a view: NCHW shape over NHWC memory
    gamma = layer.gamma.value if layer.scale else None
    beta = layer.beta.value if layer.center else None
    if training and layer.trainable:
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, gamma, beta, None, None,
                                                             True, 0.0, layer.epsilon)
        weight = 1.0 - layer.momentum         # moving * momentum + batch * (1 - momentum)
        with torch.no_grad():                 # in place: no new tensor, no copy
            layer.moving_mean.value.lerp_(mean, weight)
            # 1 / invstd^2 is the batch variance plus epsilon; the scalar comes off as a
            # 0-d tensor (a Python number costs a conversion and a copy per call)
            layer.moving_variance.value.lerp_(torch.reciprocal(invstd * invstd), weight)
            shift = weight * layer.epsilon
            layer.moving_variance.value.sub_(shift if _compiling()
                                             else _scalar(shift, invstd.device))
    else:
        out = torch.nn.functional.batch_norm(x, layer.moving_mean.value,
                                             layer.moving_variance.value, gamma, beta,
                                             False, 0.0, layer.epsilon)
    out = out.permute(0, 2, 3, 1)
    return out if layer.compute_dtype == "float32" else keras.ops.cast(out,
                                                                       layer.compute_dtype)


def _same_padding(sizes, kernel_size, strides, dilation_rate=(1, 1)) -> list[tuple]:
    """TensorFlow's "same" padding (before, after) per spatial axis."""
    pads = []
    for size, k, stride, dilation in zip(sizes, kernel_size, strides, dilation_rate):
        span = (k - 1) * dilation + 1
        total = max(span - (stride if size % stride == 0 else size % stride), 0)
        pads.append((total // 2, total - total // 2))
    return pads


def channels_last_conv2d(layer: Any, inputs: Any) -> Any | None:
    """Keras' ``Conv2D`` of a channels-last input on torch without its layout copies.

    Keras' torch convolution copies the NHWC input into NCHW memory and back into
    channels-last memory before every convolution (and again for its gradient). An
    NHWC tensor seen as NCHW (``permute``, a view) already is a channels-last tensor,
    which torch's convolutions take as it is and answer in kind, so the output viewed
    back as NHWC is Keras' result without a copy. None where it does not apply
    (another backend or layout, groups, a non-float32 compute, inside torch.compile,
    which lays out memory itself): the caller computes it as Keras does. experiments/2026-12-05-step-ops.md counts the ops."""
    if (keras.backend.backend() != "torch" or len(inputs.shape) != 4
            or layer.data_format != "channels_last" or layer.groups != 1
            or _compiling()
            or layer.compute_dtype != "float32" or inputs.dtype != layer.kernel.value.dtype):
        return None
    import torch
    import torch.nn.functional as F

    x = inputs.permute(0, 3, 1, 2)               # a view: NCHW shape over NHWC memory
    kernel = layer.kernel.value.permute(3, 2, 0, 1)   # HWIO -> OIHW, a view
    if not kernel.is_contiguous(memory_format=torch.channels_last):
        # a kernel in HWIO memory (not laid out by channels_last_kernel): OHWI memory,
        # as torch wants it, by one 2-D transpose
        h, w, cin, cout = layer.kernel.shape
        kernel = (layer.kernel.value.reshape(h * w * cin, cout).t().contiguous()
                  .view(cout, h, w, cin).permute(0, 3, 1, 2))
    padding: Any = 0
    if layer.padding == "same":
        pads = _same_padding(x.shape[2:], layer.kernel_size, layer.strides,
                             layer.dilation_rate)
        if all(a == b for a, b in pads):
            padding = [a for a, _ in pads]
        else:                                    # TensorFlow's: the extra row at the end
            x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    bias = layer.bias.value if layer.use_bias else None
    out = F.conv2d(x, kernel, bias, tuple(layer.strides), padding,
                   tuple(layer.dilation_rate))
    out = out.permute(0, 2, 3, 1)
    return layer.activation(out) if layer.activation is not None else out


def channels_last_kernel(layer: Any) -> None:
    """On torch, hold a channels-last ``Conv2D``'s kernel in OHWI memory: to Keras it
    stays an HWIO kernel (shape, values, saving, assignment, other backends), seen
    through strides; torch's channels-last convolution takes it as it is (no transpose
    before the convolution) and answers its gradient in the same memory (no copy after
    it). Keras' torch convolution reads any strides, so a kernel laid out otherwise only
    costs :func:`channels_last_conv2d` a transpose. Nothing happens elsewhere."""
    if (keras.backend.backend() != "torch" or layer.data_format != "channels_last"
            or len(layer.kernel.shape) != 4):
        return
    import torch

    value = layer.kernel.value
    with torch.no_grad():
        value.data = value.data.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)


def channels_last_max_pool2d(layer: Any, inputs: Any) -> Any | None:
    """Keras' ``MaxPooling2D`` of a channels-last input on torch, in channels-last
    memory. Keras' torch pooling copies its input into NCHW memory and answers in it,
    so every layer after the stem's max-pool would run in NCHW memory, and each
    convolution re-lays out its kernel (about a third of a ResNet50 CPU step's time).
    Inside torch.compile too: Keras pads "same" by replication, whose compiled
    backward fails on channels-last tensors. None where it does not apply (another
    backend or layout, a "same" padding torch's ``ceil_mode`` cannot express): the
    caller computes it as Keras does."""
    if (keras.backend.backend() != "torch" or len(inputs.shape) != 4
            or layer.data_format != "channels_last"):
        return None
    import torch.nn.functional as F

    x = inputs.permute(0, 3, 1, 2)               # a view: NCHW shape over NHWC memory
    padding, ceil_mode = [0, 0], False
    if layer.padding == "same":
        pads = _same_padding(x.shape[2:], layer.pool_size, layer.strides)
        padding = [a for a, _ in pads]
        # the extra row at the end: a window torch's ceil_mode lets hang over the edge
        ceil_mode = any(b != a for a, b in pads)
        for size, k, stride, (a, b) in zip(x.shape[2:], layer.pool_size, layer.strides,
                                           pads):
            torch_size = math.ceil((size + 2 * a - k) / stride) + 1 if ceil_mode \
                else (size + 2 * a - k) // stride + 1
            if b - a not in (0, 1) or 2 * a > k or torch_size != -(-size // stride):
                return None
    out = F.max_pool2d(x, tuple(layer.pool_size), tuple(layer.strides), padding,
                       ceil_mode=ceil_mode)
    return out.permute(0, 2, 3, 1)


def _pack(tensors: list[Any]) -> Any:
    """One flat tensor holding the 1-D ``tensors``' values, each tensor rebound to its
    slice of it (``Tensor.data``, as PyTorch's flat-parameter wrappers do), so an op on
    the flat tensor updates them all."""
    import torch

    with torch.no_grad():
        flat = torch.cat([t.detach() for t in tensors])
        start = 0
        for t in tensors:
            t.data = flat[start:start + t.numel()]
            start += t.numel()
    return flat


def _views_of(flat: Any, tensors: list[Any]) -> bool:
    """Whether ``tensors`` still are ``flat``'s consecutive slices (as _pack left them)."""
    address, start = flat.data_ptr(), 0
    for t in tensors:
        if t.data_ptr() != address + start * flat.element_size():
            return False
        start += t.numel()
    return start == flat.numel()


def fuse_adam(optimizer: Any) -> Any:
    """On torch, let Keras' Adam (or AdamW) update every variable in one fused op.

    Keras' torch Adam updates with ``torch._foreach_*`` ops, which on a CPU fall back to
    one op per variable (and a conversion of the 0-d learning-rate tensor each), about
    1,300 ops a ResNet50 step; PyTorch's fused Adam (``torch._fused_adam_``, a CPU and
    a GPU kernel) does the step in one, with Keras' arithmetic: PyTorch adds epsilon
    after the bias correction, Keras before it, so each step passes Keras' epsilon
    scaled by that step's correction (the step count is read from the device once,
    then counted here). Each variable is updated in its own memory layout (a kernel
    kept in OHWI memory by :func:`channels_last_kernel` seen in that order, not copied
    in and out), and the vectors (biases, batch-norm scales and offsets: two thirds of
    a ResNet's variables) as one flat tensor, their values and moments rebound to its
    slices once: the CPU kernel reads the step count once per tensor it is given, and
    the gradients' concatenation is the one op added. Keras' update is kept elsewhere:
    other backends, AMSGrad, gradient accumulation, variables not all float32, and
    inside torch.compile (which fuses the foreach ops itself).

    Keras has no public hook for the update: this replaces the optimizer's
    ``_parallel_update_step`` (Keras 3.15's torch Adam; ``tests/test_backend.py``
    fails when Keras stops calling it). experiments/2026-12-05-step-ops.md counts it.
    """
    if (keras.backend.backend() != "torch"
            or not isinstance(optimizer, keras.optimizers.Adam) or optimizer.amsgrad
            or optimizer.gradient_accumulation_steps
            or not hasattr(optimizer, "_parallel_update_step")):
        return optimizer
    import torch

    keras_update = optimizer._parallel_update_step
    count: list[int] = []        # the step this update makes, once read
    packed: list[Any] = [None, None]   # the vectors' ids; value, moment, velocity flats

    def update(grads, variables, learning_rate):
        values = [v.value for v in variables]
        if _compiling() or any(
                v.dtype != torch.float32 or g.dtype != torch.float32
                for v, g in zip(values, grads)):
            count.clear()
            return keras_update(grads, variables, learning_rate)
        if not count:
            count.append(int(optimizer.iterations.value))
        count[0] += 1
        beta_1, beta_2 = float(optimizer.beta_1), float(optimizer.beta_2)
        eps = float(optimizer.epsilon) / math.sqrt(1.0 - beta_2 ** count[0])
        index = optimizer._get_variable_index
        step = (optimizer.iterations.value + 1).to(torch.float32)
        lr = torch.as_tensor(getattr(learning_rate, "value", learning_rate),
                             dtype=torch.float32, device=values[0].device)
        moments = [optimizer._momentums[index(v)].value for v in variables]
        velocities = [optimizer._velocities[index(v)].value for v in variables]
        grads = list(grads)
        # the fused op walks the four tensors' memory in step, and on a CPU copies a
        # non-contiguous one in and out: each in the variable's layout, seen in the
        # order of its memory (a kernel in OHWI memory, channels_last_kernel)
        for i, value in enumerate(values):
            if grads[i].stride() != value.stride():
                grads[i] = torch.empty_like(value).copy_(grads[i])
            for state in (moments[i], velocities[i]):
                if state.stride() != value.stride():
                    with torch.no_grad():
                        state.data = torch.empty_like(value).copy_(state.data)
            if not value.is_contiguous():
                order = sorted(range(value.dim()), key=lambda d: -value.stride(d))
                values[i], grads[i], moments[i], velocities[i] = (
                    t.permute(order) for t in (value, grads[i], moments[i], velocities[i]))
        # the vectors (biases, batch-norm scales and offsets) updated as one tensor
        small = [i for i, value in enumerate(values) if value.dim() == 1]
        if len(small) > 1:
            big = [i for i, value in enumerate(values) if value.dim() != 1]
            key = tuple(id(variables[i]) for i in small)
            groups = ([values[i] for i in small], [moments[i] for i in small],
                      [velocities[i] for i in small])
            if packed[0] != key or not all(_views_of(flat, group)
                                           for flat, group in zip(packed[1], groups)):
                packed[:] = [key, [_pack(group) for group in groups]]
            flats = packed[1]
            values = [values[i] for i in big] + [flats[0]]
            moments = [moments[i] for i in big] + [flats[1]]
            velocities = [velocities[i] for i in big] + [flats[2]]
            grads = [grads[i] for i in big] + [torch.cat([grads[i] for i in small])]
        with torch.no_grad():
            torch._fused_adam_(
                values, grads, moments, velocities,
                [], [step] * len(values), lr=lr, beta1=beta_1, beta2=beta_2,
                weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)

    optimizer._parallel_update_step = update
    return optimizer


def fuse_ema(optimizer: Any) -> Any:
    """On torch, update the optimizer's moving average of the weights (``use_ema``,
    ``train.ema_decay``) with one ``torch._foreach_lerp_`` a step.

    Keras updates each average with about eight small ops (the first-step test, casts,
    two products and a sum), some 500 a step for a ResNet18 and 1,300 for a ResNet50;
    the fused op gives the same values: ``momentum x average + (1 - momentum) x
    weight``, the weight itself at the optimizer's first step. Keras' update is kept
    elsewhere: other backends, inside torch.compile, and averages of another dtype.

    Keras has no public hook for the average: this replaces the optimizer's
    ``_update_model_variables_moving_average`` (Keras 3.15; ``tests/test_backend.py``
    fails when Keras stops calling it).
    """
    if (keras.backend.backend() != "torch" or not getattr(optimizer, "use_ema", False)
            or not hasattr(optimizer, "_update_model_variables_moving_average")):
        return optimizer
    import torch

    keras_average = optimizer._update_model_variables_moving_average
    fresh: list[bool] = []       # whether the next update is the optimizer's first step

    def average(trainable_variables):
        pairs = [(v.value, a.value) for v, a in
                 zip(trainable_variables, optimizer._model_variables_moving_average)
                 if a is not None]
        if _compiling() or any(v.dtype != a.dtype for v, a in pairs):
            fresh.clear()
            return keras_average(trainable_variables)
        if not fresh:
            fresh.append(int(optimizer.iterations.value) == 0)
        weight = 1.0 if fresh[0] else 1.0 - float(optimizer.ema_momentum)
        fresh[0] = False
        with torch.no_grad():
            torch._foreach_lerp_([a for _, a in pairs], [v for v, _ in pairs], weight)

    optimizer._update_model_variables_moving_average = average
    return optimizer


def sublayers(layer: Any) -> Iterator[Any]:
    """Every layer inside ``layer``, depth first, through public attributes: a model's
    ``layers``, and layers held as attributes (wrappers such as keras-cv's
    ``RandomApply``), which on torch are the module's ``children()``."""
    seen: set[int] = {id(layer)}
    stack = [layer]
    while stack:
        current = stack.pop()
        children = list(getattr(current, "layers", None) or [])
        children += list(vars(current).values())
        if keras.backend.backend() == "torch":
            children += list(current.children())
        children = [c for c in children if isinstance(c, keras.layers.Layer)]
        for child in reversed(children):
            if id(child) not in seen:
                seen.add(id(child))
                yield child
                stack.append(child)


@contextlib.contextmanager
def substituted_values(variables: list[Any], values: list[Any]) -> Iterator[None]:
    """Let each Keras variable read as the given array while the block runs, then
    restore it, without copying (JAX only).

    Keras has no public way to do this: it sets ``Variable._value``, the array a JAX
    variable holds (checked on Keras 3.8-3.15; ``tests/test_backend.py`` fails when a
    Keras release changes it). Used to save a replicated global array from one process
    of a multi-process run without a collective.
    """
    saved = [v._value for v in variables]
    try:
        for v, value in zip(variables, values):
            v._value = value
        yield
    finally:
        for v, value in zip(variables, saved):
            v._value = value


def moving_averages(optimizer: Any) -> list[tuple[Any, Any]]:
    """(trained variable, its exponential moving average) pairs of an optimizer built
    with ``use_ema=True``, in the order the optimizer updates them.

    Keras keeps the averages for ``SwapEMAWeights`` and ``finalize_variable_values``
    but has no public way to read them: this reads the optimizer's
    ``_trainable_variables`` and ``_model_variables_moving_average`` (Keras 3.15;
    ``tests/test_backend.py`` fails when a Keras release renames them).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)   # a LossScaleOptimizer's
    return [(v, a) for v, a in zip(inner._trainable_variables,
                                   inner._model_variables_moving_average, strict=True)
            if a is not None]
