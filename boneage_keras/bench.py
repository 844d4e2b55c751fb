"""Throughput figures: input pipelines (originals vs cache, with/without augmentation)
and the training step (our ``fit`` vs a bare ``train_on_batch``) on the active backend.

    >>> figures = run_bench(cfg, data_dir, images=300)   # boneage bench prints them as JSON
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import keras
import numpy as np
import pandas as pd

from .backend import (
    cpu_has_bfloat16,
    gpu_available,
    mixed_precision_policy,
    peak_accelerator_memory_mb,
    synchronize,
)
from .cache import find_cache
from .callbacks import StopOnSignal
from .config import Config, geometry
from .data import load_dataset
from .images import load_image
from .inputs import model_inputs
from .model import build_model
from .train import compile_model


def _repeat_table(table: pd.DataFrame, n: int) -> pd.DataFrame:
    reps = int(np.ceil(n / len(table)))
    return pd.concat([table] * reps, ignore_index=True).head(n)


def iterate(data: Any) -> Any:
    """Batches of a loader as ``fit`` would draw them: a PyDataset through worker
    threads (``data.workers``), a tf.data dataset as it is."""
    if not isinstance(data, keras.utils.PyDataset):
        yield from data
        return
    data.on_epoch_begin()
    with ThreadPoolExecutor(max(1, data.workers)) as pool:
        yield from pool.map(data.__getitem__, range(len(data)))


def pipeline_throughput(table: pd.DataFrame, cfg: Config, augment: bool,
                        reader: Any = load_image) -> float:
    """Images per second delivered by the configured loader over ``table`` (one pass)."""
    from .loaders import make_loader

    data = make_loader(table, cfg, training=augment, reader=reader)
    count = 0
    start = time.perf_counter()
    for batch in iterate(data):          # (inputs, boneage[, weight])
        count += len(batch[1])
    return count / (time.perf_counter() - start)


def pipeline_variants() -> list[tuple[str, tuple[str, ...]]]:
    """(loader, augmentation engines) pairs that run here: tf.data with keras-cv and
    the PyDataset with each engine where TensorFlow is installed, else the PyDataset
    with the Keras and NumPy engines."""
    from .augment import tensorflow_available

    if tensorflow_available():
        return [("tfdata", ("keras-cv",)), ("pydataset", ("keras-cv", "keras", "numpy"))]
    return [("pydataset", ("keras", "numpy"))]


class _SameBatch(keras.utils.PyDataset):
    """One batch, ``steps`` times: the fit path without TensorFlow."""

    def __init__(self, x: np.ndarray, y: np.ndarray, steps: int) -> None:
        super().__init__()
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x, self.y


def _random_batch(cfg: Config) -> tuple[Any, np.ndarray]:
    """A batch of random images and ages shaped as the model takes them (with the sex
    input as ``{"image", "male"}`` where the model has it)."""
    size, batch = cfg.data.image_size, cfg.train.batch_size
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 1)).astype(np.float32)
    y = rng.uniform(0, 230, (batch,)).astype(np.float32)
    male = rng.integers(0, 2, (batch, 1)).astype(np.float32)
    return model_inputs(x, male, cfg.model.use_sex), y


def step_times(cfg: Config, steps: int = 10, warmup: int = 2,
               rounds: int = 3) -> dict[str, Any]:
    """ms per training step: our path (``model.fit`` with the per-batch callback
    ``train`` adds, over a tf.data dataset where TensorFlow is installed, else a
    PyDataset) vs a bare ``train_on_batch`` on the same model and batch."""
    batch = cfg.train.batch_size
    x, y = _random_batch(cfg)
    if cfg.train.mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision_policy())
    try:
        model = compile_model(build_model(cfg), cfg)
        if importlib.util.find_spec("tensorflow") is not None:
            from .backend import tensorflow_for_input
            from .loaders import PREFETCH_BATCHES, pipeline_options

            tf = tensorflow_for_input()
            data = (tf.data.Dataset.from_tensors((x, y)).repeat(steps).cache()
                    .with_options(pipeline_options()).prefetch(PREFETCH_BATCHES))
            warm, fit_input = data.take(warmup), "tf.data"
        else:
            data, warm, fit_input = _SameBatch(x, y, steps), _SameBatch(x, y, warmup), \
                "PyDataset"
        callbacks = [StopOnSignal()]   # not installed: only its per-batch hook
        for _ in range(warmup):
            model.train_on_batch(x, y)
        # shuffle=False: a tf.data input comes in its own order (Keras warns otherwise)
        model.fit(warm, verbose=0, shuffle=False, callbacks=callbacks)

        def bare_steps() -> None:
            for _ in range(steps):
                model.train_on_batch(x, y)

        bare, fitted = [], []
        for _ in range(rounds):   # alternate, so drifts hit both alike; report medians
            bare.append(_seconds(bare_steps) / steps)
            fitted.append(_seconds(lambda: model.fit(data, epochs=1, verbose=0,
                                                     shuffle=False,
                                                     callbacks=callbacks)) / steps)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    tob, fit = float(np.median(bare)), float(np.median(fitted))
    return {"train_on_batch_ms": 1000 * tob, "fit_ms": 1000 * fit,
            "fit_over_train_on_batch": fit / tob, "images_per_s": batch / fit,
            "fit_input": fit_input,
            "rounds_train_on_batch_ms": [round(1000 * b, 1) for b in bare],
            "rounds_fit_ms": [round(1000 * f, 1) for f in fitted]}


def _fit_images_per_s(model: keras.Model, x: np.ndarray, y: np.ndarray, global_batch: int,
                      steps: int, rounds: int = 3) -> float:
    model.fit(_SameBatch(x, y, 2), verbose=0)            # compile and warm up
    times = [_seconds(lambda: model.fit(_SameBatch(x, y, steps), verbose=0))
             for _ in range(rounds)]
    return global_batch * steps / float(np.median(times))


def replica_scaling(cfg: Config, steps: int = 10) -> dict[str, Any]:
    """Training images/s (``fit``) on one replica and on ``distribute``'s replicas, same
    global batch. On a CPU split into devices this measures the overhead only (the
    devices share the cores); on several GPUs, the real scaling. Under torchrun the
    processes would contend for the one-replica figure: it is left out there (run
    ``bench`` without torchrun for it)."""
    from .distribute import setup

    replicas = setup(cfg)
    batch = cfg.train.batch_size
    x, y = _random_batch(cfg)
    out: dict[str, Any] = {"replicas": replicas.replicas, "processes": replicas.processes,
                           "engine": replicas.engine}
    if replicas.processes == 1:
        with replicas.local_scope():
            one = compile_model(build_model(cfg), cfg)
            out["one_replica_images_per_s"] = round(
                _fit_images_per_s(one, x, y, batch, steps), 2)
    with replicas.scope():
        model = compile_model(build_model(cfg), cfg)
    replicas.prepare_model(model)
    local = replicas.process_batch(batch)
    first = replicas.index * local
    out["replicas_images_per_s"] = round(_fit_images_per_s(
        model, keras.tree.map_structure(lambda v: v[first:first + local], x),
        y[first:first + local], batch, steps), 2)
    if "one_replica_images_per_s" in out:
        out["speedup"] = round(out["replicas_images_per_s"]
                               / out["one_replica_images_per_s"], 3)
    return out


def _seconds(work: Any) -> float:
    """Wall seconds of ``work()``, the GPU's queue drained before and after."""
    synchronize()
    start = time.perf_counter()
    work()
    synchronize()
    return time.perf_counter() - start


def _peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    gpu = peak_accelerator_memory_mb()
    if gpu is not None:
        out["peak_gpu_mb"] = gpu
    return out


def run_bench(cfg: Config, data_dir: str | None, images: int = 300,
              steps: int = 10, pipelines: bool = True, training: bool = True) -> dict[str, Any]:
    """All figures as one dict (what ``boneage bench`` prints). Pretrained weights do
    not change the timing, so the model is built without them (nothing to download)."""
    cfg.model.weights = None
    if training and cfg.distribute.strategy == "data_parallel":
        from .distribute import setup

        setup(cfg)   # before anything starts the backend's devices
    result: dict[str, Any] = {
        "backend": keras.backend.backend(), "gpu": gpu_available(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu_bfloat16": cpu_has_bfloat16(),
        "image_size": cfg.data.image_size, "batch_size": cfg.train.batch_size,
        "backbone": cfg.model.backbone,
        "precision": mixed_precision_policy() if cfg.train.mixed_precision else "float32",
    }
    if pipelines and data_dir:
        table = _repeat_table(load_dataset(data_dir, check_images=False)[0], images)
        result["images"] = len(table)
        cache = find_cache(table, data_dir, cfg.data.image_size, geometry(cfg.data),
                           cfg.data.cache_dir)
        sources = {"originals": load_image}
        if cache is not None:
            sources[f"cache{cache.size}"] = cache.load
        figures = {}
        for loader, engines in pipeline_variants():
            cfg.data.loader = loader
            for name, reader in sources.items():
                figures[f"{loader}/{name}/plain"] = round(
                    pipeline_throughput(table, cfg, False, reader), 1)
                for engine in engines:
                    cfg.augment.engine = engine
                    figures[f"{loader}/{name}/{engine}"] = round(
                        pipeline_throughput(table, cfg, True, reader), 1)
        result["pipeline_images_per_s"] = figures
        # decoding the originals one image at a time, no pipeline: the reference
        start = time.perf_counter()
        for path in table["path"].head(min(len(table), 60)):
            load_image(path, cfg.data.image_size, geometry(cfg.data))
        result["decode_per_image_images_per_s"] = round(
            min(len(table), 60) / (time.perf_counter() - start), 1)
    if training and cfg.distribute.strategy == "data_parallel":
        result["replica_scaling"] = replica_scaling(cfg, steps)
    elif training:
        result["train_step"] = {k: round(v, 3) if isinstance(v, float) else v
                                for k, v in step_times(cfg, steps).items()}
    result.update({k: round(v, 1) for k, v in _peak_memory().items()})
    return result
