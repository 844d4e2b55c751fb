"""backend.py: the per-backend helpers, and the one private Keras attribute the package
uses (a test here fails when a Keras release changes it)."""

import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO, backend_env

from boneage_keras.backend import jit_setting, sublayers, value_and_gradient
from boneage_keras.config import load_config
from boneage_keras.model import build_model


def test_substituted_values_swaps_and_restores_a_jax_variable():
    """Variable._value on JAX: a multi-process run saves through it (distribute.py)."""
    code = (
        "import keras, numpy as np, jax.numpy as jnp\n"
        "from boneage_keras.backend import substituted_values\n"
        "v = keras.Variable(np.zeros((2, 2), 'float32'))\n"
        "with substituted_values([v], [jnp.ones((2, 2), 'float32')]):\n"
        "    inside = float(np.asarray(v.value).sum())\n"
        "    saved = float(keras.ops.convert_to_numpy(keras.ops.sum(v)))\n"
        "print(inside, saved, float(np.asarray(v.value).sum()))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=backend_env("jax"),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4.0", "4.0", "0.0"]


def test_sublayers_finds_nested_and_wrapped_layers():
    cfg = load_config("configs/cpu-bench.yaml", ["data.image_size=32"])
    model = build_model(cfg)
    norms = [la for la in sublayers(model)
             if isinstance(la, keras.layers.BatchNormalization)]
    # ResNet18: the stem, two per basic block (8 blocks), three downsampling shortcuts
    assert len(norms) == 20 and len({id(n) for n in norms}) == 20

    class Wrapper(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(2)

    wrapped = Wrapper()
    assert list(sublayers(wrapped)) == [wrapped.inner]


def test_value_and_gradient_of_a_sum_of_squares():
    x = keras.ops.convert_to_tensor(np.array([[1.0, -2.0, 3.0]], np.float32))
    y, grad = value_and_gradient(lambda t: t * t, x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), [[1.0, 4.0, 9.0]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grad), [[2.0, -4.0, 6.0]])


def test_jit_setting_compiles_nothing_on_a_cpu_unless_asked():
    assert jit_setting(None) is False          # torch, no GPU here
    assert jit_setting(True) is True


def test_tensorflow_backend_starts_quietly_unless_verbose():
    """TensorFlow's C++ core prints while it looks for devices (cuInit without a GPU):
    nothing of it reaches stderr unless BONEAGE_VERBOSE=1 (``boneage --verbose``)."""
    code = ("import boneage_keras, keras, numpy as np\n"
            "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
            "m.predict(np.ones((2, 3)), verbose=0)\n")
    env = {**backend_env("tensorflow"), "TF_CPP_MIN_LOG_LEVEL": "0"}
    quiet = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr.strip() == ""
    loud = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env={**env, "BONEAGE_VERBOSE": "1"}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert loud.returncode == 0 and loud.stderr.strip() != ""


def _adam_trajectory(optimizer_class, fused, start_step=0, **options):
    import torch

    from boneage_keras.backend import fuse_adam

    variable = keras.Variable(np.array([1.0, -2.0, 3.0, 0.5], "float32"))
    optimizer = optimizer_class(keras.optimizers.schedules.CosineDecay(0.1, 10),
                                **options)
    if fused:
        fuse_adam(optimizer)
    optimizer.build([variable])
    optimizer.iterations.assign(start_step)          # as a resumed run's optimizer
    steps = []
    for grad in ([0.5, -0.1, 1e-3, 1e-6], [0.2, 0.3, -1e-3, 2e-6], [0.1, 0.1, 0.1, 0.0]):
        optimizer.apply([torch.tensor(grad)], [variable])
        steps.append(keras.ops.convert_to_numpy(variable).copy())
    return np.array(steps), optimizer


@pytest.mark.parametrize("optimizer_class, options, start_step", [
    (keras.optimizers.Adam, {}, 0),
    (keras.optimizers.Adam, {}, 40),
    (keras.optimizers.AdamW, {"weight_decay": 0.05}, 0),
])
def test_fused_adam_follows_keras_adam(optimizer_class, options, start_step):
    """Keras' arithmetic (epsilon before the bias correction, gradients near epsilon
    included), in PyTorch's one fused op: the op a training step dispatches."""
    from torch.profiler import ProfilerActivity, profile

    assert keras.backend.backend() == "torch"
    theirs, _ = _adam_trajectory(optimizer_class, False, start_step, **options)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours, optimizer = _adam_trajectory(optimizer_class, True, start_step, **options)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations.value) == start_step + 3
    ops = {e.key: e.count for e in prof.key_averages()}
    # fails when Keras no longer updates through _parallel_update_step
    assert ops.get("aten::_fused_adam_") == 3 and "aten::_foreach_add_" not in ops, ops


@pytest.mark.parametrize("fused", [False, True])
def test_moving_averages_are_the_optimizers_ema_of_each_step(fused):
    """train.ema_decay reads Keras' moving averages through one private attribute
    pair (moving_averages) and, on torch, updates them in one fused op (fuse_ema, with
    fuse_adam as training uses it): the averages follow Keras' definition step by step,
    from the first step's weights. Fails when Keras renames the attributes or stops
    updating through _update_model_variables_moving_average."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from boneage_keras.backend import fuse_adam, fuse_ema, moving_averages

    variables = [keras.Variable(np.array([1.0, -2.0], "float32")),
                 keras.Variable(np.array([[0.5]], "float32"))]
    optimizer = keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.75)
    if fused:
        fuse_ema(fuse_adam(optimizer))
    optimizer.build(variables)
    expected = None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for grads in ([[0.5, -0.1], [[1.0]]], [[0.2, 0.3], [[-1.0]]], [[0.1, 0.1], [[0.3]]]):
            optimizer.apply([torch.tensor(g) for g in grads], variables)
            now = [keras.ops.convert_to_numpy(v).copy() for v in variables]
            expected = now if expected is None else [0.75 * e + 0.25 * n
                                                     for e, n in zip(expected, now)]
    pairs = moving_averages(optimizer)
    assert [id(v) for v, _ in pairs] == [id(v) for v in variables]
    for (_, average), want, latest in zip(pairs, expected, now):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(average), want, rtol=1e-6)
        assert not np.allclose(want, latest)        # the average lags the weights
    lerps = {e.key: e.count for e in prof.key_averages()}.get("aten::_foreach_lerp_", 0)
    assert lerps == (3 if fused else 0)


def test_fused_adam_packs_vectors_and_keeps_kernels_in_their_memory():
    """A backbone's variables: conv kernels in OHWI memory (model.Conv) and many
    vectors. The fused update gives Keras' Adam's values, copies no kernel in or out,
    and reads the step count from memory (a host sync on a GPU) once for the kernel
    and once for all vectors together, not once per variable."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from boneage_keras.backend import fuse_adam
    from boneage_keras.model import Conv

    rng = np.random.default_rng(0)
    conv = Conv(6, 3, use_bias=True)
    conv.build((1, 5, 5, 4))
    variables = [conv.kernel, conv.bias] + [
        keras.Variable(rng.normal(size=n).astype("float32")) for n in (3, 5, 7, 2)]
    starts = [rng.normal(size=v.shape).astype("float32") for v in variables]
    steps = [[rng.normal(size=v.shape).astype("float32") for v in variables]
             for _ in range(3)]
    trajectories = []
    for fused in (False, True):
        for v, start in zip(variables, starts):
            v.assign(start)
        optimizer = keras.optimizers.Adam(0.01)
        if fused:
            fuse_adam(optimizer)
        optimizer.build(variables)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for grads in steps:
                optimizer.apply([torch.tensor(g) for g in grads], variables)
        trajectories.append([v.numpy().copy() for v in variables])
    for ours, theirs in zip(*reversed(trajectories)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert conv.kernel.value.permute(3, 0, 1, 2).is_contiguous()
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("aten::_fused_adam_") == 3
    assert "aten::clone" not in ops, ops          # no kernel copied in and out
    # the step count read once at the start; then per step the kernel's step read,
    # the five vectors' one and the learning rate's (one per variable would be 7)
    assert ops.get("aten::item", 0) <= 1 + 3 * 3, ops
