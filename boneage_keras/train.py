"""Train a bone-age model end to end and leave a complete run directory.

    runs/<name>/
      config.yaml   the resolved config          split.csv   id, boneage, male, split
      run.json      backend, devices, versions   history.csv one row per epoch
      best.keras    best validation tolerance    last.keras  the latest epoch
                    accuracy (no optimizer)                  (no optimizer)
      curves.png    loss/MAE/tolerance accuracy  train.log   what was read, dropped, used
      backup/       the resumable state: weights with optimizer state, epoch, best
                    value so far and early stopping's wait (state.json)

Every file is written to a temporary name and renamed, so a kill at any instant leaves
the previous complete file; ``resume`` continues from the last finished epoch with the
best value and the patience counter it had, and extends a finished run only when asked
(``train.epochs`` raised).

    >>> from boneage_keras.config import load_config
    >>> result = train(load_config("configs/default.yaml", ["train.epochs=3"]))
    >>> result = resume(result.run_dir, ["train.epochs=5"])     # two more epochs
"""

from __future__ import annotations

import datetime
import logging
import math
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from . import __version__
from .backend import devices, gpu_available, mixed_precision_policy
from .cache import reader_for
from .config import (
    Config,
    ConfigError,
    config_to_yaml,
    geometry,
    load_config,
    parse_override,
)
from .console import native_stderr_silenced
from .data import load_dataset, resolve_data_dir, split_table, subsample
from .distribute import Replicas, effective_learning_rate
from .distribute import current as current_replicas
from .distribute import setup as setup_replicas
from .errors import BoneAgeError
from .files import (
    TMP_MARK,
    forbid_writes,
    make_writable_dir,
    replacing,
    write_csv,
    write_json,
    write_text,
)
from .metrics import ToleranceAccuracy
from .model import build_model, refresh_batchnorm
from .plots import plot_curves

log = logging.getLogger(__name__)
MONITOR = "val_tolerance_accuracy"
STATE = "state.json"
SETUP_FILES = ("config.yaml", "split.csv", "run.json", "train.log")
# what --resume may change: where the data is and how it is read, and how long to train
RESUMABLE_KEYS = ("train.epochs", "train.early_stopping_patience", "data.data_dir",
                  "data.workers", "data.use_cache", "data.cache_dir",
                  "distribute.strategy", "distribute.devices", "distribute.cpu_devices",
                  "distribute.timeout_s", "distribute.coordinator",
                  "distribute.num_processes", "distribute.process_id")


class RunDirError(BoneAgeError, RuntimeError):
    """A run directory cannot be created or resumed; the message says what to do."""


class TrainingInterrupted(BoneAgeError, RuntimeError):
    """Training stopped early by the user; the run can be resumed."""


class NonFiniteLoss(BoneAgeError, RuntimeError):
    """The training loss became NaN or infinite; the message says where."""


class StopOnSignal(keras.callbacks.Callback):
    """Turn Ctrl-C / SIGTERM into a clean stop at the next batch end.

    The interrupted epoch is not recorded; the backup holds the last finished one.
    A second signal stops at once. ``async_safe``: Keras may run the batch hook in its
    callback thread, so it never makes the training loop wait for the GPU.
    """

    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: stopping after this batch (again to stop now)")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self.requested:
            raise KeyboardInterrupt


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best: dict[str, float]  # the validation metrics of the epoch in best.keras
    best_epoch: int = 0     # 1-based
    stopped_early: bool = False
    process: str | None = None  # this process's name in a run of several processes


def cosine_learning_rate(epoch: int, base: float, epochs: int, period: int | None = None,
                         warmup: int = 0, minimum: float = 0.0) -> float:
    """Learning rate of ``epoch`` (0-based): linear warmup, then cosine annealing.

    With ``period`` T the rate follows ``min + (base - min)(1 + cos(pi t / T)) / 2``
    for all t, as PyTorch's CosineAnnealingLR(T_max=T): down over T epochs, back up
    over the next T. Without it, one decay over the remaining epochs.
    """
    if epoch < warmup:
        return base * (epoch + 1) / warmup
    t = epoch - warmup
    span = period or max(1, epochs - warmup)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * t / span))


def make_optimizer(cfg: Config) -> keras.optimizers.Optimizer:
    t = cfg.train
    decay = t.weight_decay or None
    lr = effective_learning_rate(cfg)
    if t.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, weight_decay=decay)
    return keras.optimizers.Adam(lr, weight_decay=decay)


def jit_setting(cfg: Config) -> bool | str:
    """``train.jit_compile`` null: always on JAX (its eager mode is op-by-op), and on a
    GPU for torch (torch.compile) and TensorFlow (XLA); on a CPU compiling a ResNet costs
    more than it saves (experiments/2026-11-22-input-pipeline-speed.md)."""
    jit = cfg.train.jit_compile
    if jit is not None:
        return jit
    if keras.backend.backend() == "jax":
        return True
    return "auto" if gpu_available() else False


def compile_model(model: keras.Model, cfg: Config) -> keras.Model:
    """Compile with the configured optimizer, loss, MAE/RMSE/tolerance-accuracy metrics."""
    loss = {"mae": "mean_absolute_error", "mse": "mean_squared_error",
            "huber": keras.losses.Huber(delta=12.0)}[cfg.train.loss]
    model.compile(
        optimizer=make_optimizer(cfg),
        loss=loss,
        # weighted: an image that failed to decode, or a data-parallel batch's padding,
        # comes with weight 0 and must not count
        weighted_metrics=[keras.metrics.MeanAbsoluteError(name="mae"),
                          keras.metrics.RootMeanSquaredError(name="rmse"),
                          ToleranceAccuracy(cfg.train.tolerance_months)],
        jit_compile=jit_setting(cfg),
    )
    return model


# --- the run directory ------------------------------------------------------------


def run_complete(state: dict[str, Any] | None) -> bool:
    """Whether a run's state says it trained all it was to (or stopped early)."""
    return state is not None and (state["finished"] or state["stopped_early"]
                                  or state["epoch"] >= state["epochs_planned"])


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The resumable state of a run (``backup/state.json``), or None before epoch 1."""
    import json

    path = run_dir / "backup" / STATE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _is_setup_only(run_dir: Path) -> bool:
    """A folder left by a train that failed before its first epoch (reusable)."""
    return (read_state(run_dir) is None and not (run_dir / "history.csv").exists()
            and not (run_dir / "best.keras").exists())


def new_run_dir(cfg: Config, replicas: Replicas) -> Path:
    """The new run's folder, made by the chief (every process gets the chief's name)."""
    name = replicas.agree_text(cfg.train.run_name
                               or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(cfg.train.output_dir) / name
    if run_dir.exists() and not _is_setup_only(run_dir):
        raise RunDirError(f"run directory {run_dir} already holds a trained run. Resume "
                          f"it with `boneage train --resume {run_dir}` or choose another "
                          "train.run_name.")
    if not replicas.chief:
        return run_dir
    try:
        make_writable_dir(run_dir)
    except OSError as err:
        raise RunDirError(f"cannot write the run directory {run_dir} ({err.strerror}); "
                          "set train.output_dir to a writable folder.") from None
    return run_dir


def make_split(cfg: Config) -> pd.DataFrame:
    """Load, clean, subsample and split the data (the run's split.csv is written later)."""
    table, _, _ = load_dataset(cfg.data.data_dir, strict=cfg.data.strict,
                               age_range=cfg.data.age_range, cache_dir=cfg.data.cache_dir)
    table = subsample(table, cfg.data.max_images, cfg.train.seed)
    split = split_table(table, cfg.data.split, cfg.data.val_fraction,
                        cfg.data.test_fraction, cfg.train.seed)
    counts = split["split"].value_counts().to_dict()
    log.info("split (%s, seed %d): %s", cfg.data.split, cfg.train.seed, counts)
    return split


def saved_split(cfg: Config, run_dir: Path) -> pd.DataFrame:
    """The run's own split.csv joined to the data's current paths."""
    split_csv = run_dir / "split.csv"
    merged = _join_split(cfg, pd.read_csv(split_csv, dtype={"id": str}), str(split_csv))
    log.info("reusing split from %s", split_csv)
    return merged


def _join_split(cfg: Config, split: pd.DataFrame, source: str) -> pd.DataFrame:
    table, _, _ = load_dataset(cfg.data.data_dir, strict=cfg.data.strict,
                               age_range=cfg.data.age_range, cache_dir=cfg.data.cache_dir)
    merged = split[["id", "split"]].merge(table, on="id", how="left")
    missing = merged["path"].isna()
    if missing.any():
        raise RunDirError(f"{source}: {int(missing.sum())} id(s) not in the data (e.g. "
                          f"{merged.loc[missing, 'id'].iloc[0]}); point --data-dir "
                          "(--set data.data_dir=...) at the data the split was made from.")
    return merged


def image_reader(cfg: Config, table: pd.DataFrame) -> Callable[..., np.ndarray]:
    """A prepared cache's reader when one fits the config, else decoding the files."""
    d = cfg.data
    return reader_for(table, d.data_dir, d.image_size, geometry(d), d.cache_dir,
                      d.use_cache)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _backend_version() -> str:
    backend = keras.backend.backend()
    module = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}.get(backend)
    if module is None:
        return "?"
    import importlib

    return getattr(importlib.import_module(module), "__version__", "?")


def run_info(started: str, replicas: Replicas | None = None,
             **extra: Any) -> dict[str, Any]:
    """What run.json records: where and how the run trained."""
    replicas = replicas or current_replicas()
    return {"backend": keras.backend.backend(), "devices": replicas.devices or devices(),
            "replicas": replicas.replicas, "processes": replicas.processes,
            "distribute": replicas.describe(), "versions": {"boneage_keras": __version__,
                                          "keras": keras.__version__,
                                          keras.backend.backend(): _backend_version(),
                                          "python": platform.python_version()},
            "git_commit": _git_commit(), "host": platform.node(), "started": started,
            **extra}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("boneage_keras").addHandler(handler)
    return handler


# --- the callback that owns the run's files ---------------------------------------


class RefreshBatchNorm(keras.callbacks.Callback):
    """Before each validation in ``fit``, the backbone's batch-norm statistics are
    recomputed from a fixed sample of unaugmented training images (``batches``: image
    arrays) with the current weights (``model.refresh_batchnorm``), so that validation,
    best.keras and last.keras use statistics that match their weights."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        super().__init__()
        self.batches = batches

    def on_test_begin(self, logs=None) -> None:
        refresh_batchnorm(self.model, self.batches)


def refresh_batches(train_df: pd.DataFrame, cfg: Config,
                    reader: Callable[..., np.ndarray]) -> list[np.ndarray]:
    """``train.bn_refresh_batches`` batches of training images (no more than an epoch
    trains on), drawn once (seeded), decoded without augmentation."""
    from .loaders import BoneAgeDataset

    t = cfg.train
    batches = min(t.bn_refresh_batches, t.steps_per_epoch or t.bn_refresh_batches)
    n = min(len(train_df), batches * t.batch_size)
    sample = train_df.sample(n=n, random_state=cfg.train.seed)
    data = BoneAgeDataset(sample, cfg, training=False, reader=reader)
    out = []
    for k in range(len(data)):
        inputs = data[k][0]
        out.append(inputs["image"] if isinstance(inputs, dict) else inputs)
    return out


class RunKeeper(keras.callbacks.Callback):
    """After each finished epoch: history.csv, best.keras (when the monitored value
    improves), last.keras, then the resumable state in backup/ - each written to a
    temporary name and renamed. Also early stopping (its wait counter is part of the
    state, so a resume keeps it) and a stop at the first non-finite loss.

    ``inference_twin`` is an uncompiled copy of the model: best.keras and last.keras
    are saved from it, without optimizer state.
    """

    async_safe = True   # the batch hook only reads the loss

    def __init__(self, run_dir: Path, cfg: Config, inference_twin: keras.Model,
                 state: dict[str, Any] | None, history: pd.DataFrame,
                 replicas: Replicas | None = None) -> None:
        super().__init__()
        self.run_dir, self.cfg, self.twin = run_dir, cfg, inference_twin
        self.replicas = replicas or current_replicas()
        self.writer = self.replicas.chief   # only the chief writes; all decide alike
        self.history = history
        state = state or {}
        self.best = state.get("best")             # None: no epoch yet
        self.best_epoch = state.get("best_epoch")  # 0-based
        self.wait = state.get("wait", 0)
        self.stopped_early = False
        self.epoch = state.get("epoch", 0)
        self.failure: NonFiniteLoss | None = None

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.failure is None:
            self.failure = NonFiniteLoss(
                f"training stopped: the loss became {float(loss)} at epoch "
                f"{self.epoch + 1}, batch {batch + 1}. Nothing of this epoch was saved; "
                "lower train.learning_rate, check the labels (data.age_range) or turn "
                "off train.mixed_precision, then resume or retrain.")
            raise self.failure

    def _save_inference_model(self, name: str) -> None:
        if not self.writer:
            return
        with self.replicas.local_values(self.model):
            self.twin.set_weights(self.model.get_weights())
            with replacing(self.run_dir / name) as tmp:
                self.twin.save(tmp)

    def on_epoch_end(self, epoch, logs=None) -> None:
        logs = dict(logs or {})
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"training stopped: the epoch {epoch + 1} loss is "
                                f"{float(loss)}; nothing of this epoch was saved. Lower "
                                "train.learning_rate or check the labels.")
        row = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}}
        self.history = pd.concat([self.history[self.history["epoch"] < epoch],
                                  pd.DataFrame([row])], ignore_index=True) \
            if len(self.history) else pd.DataFrame([row])
        if self.writer:
            write_csv(self.run_dir / "history.csv", self.history)
        value = logs.get(MONITOR)
        improved = value is not None and (self.best is None or value > self.best)
        if improved:
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            self._save_inference_model("best.keras")
        else:
            self.wait += 1
        self._save_inference_model("last.keras")
        patience = self.cfg.train.early_stopping_patience
        if patience and self.wait >= patience:
            self.stopped_early = True
            self.model.stop_training = True
            log.info("early stopping: no better %s for %d epochs (best epoch %d)",
                     MONITOR, self.wait, self.best_epoch + 1)
        self.save_state(epoch + 1)

    def save_state(self, epochs_done: int, finished: bool = False) -> None:
        """Weights with optimizer state, then state.json naming them (the order matters:
        a kill between the two leaves state.json naming the previous, complete file)."""
        if not self.writer:
            return
        backup = self.run_dir / "backup"
        backup.mkdir(exist_ok=True)
        weights = f"state-{epochs_done:04d}.weights.h5"
        if not (backup / weights).is_file() or not finished:
            with replacing(backup / weights) as tmp, \
                    self.replicas.local_values(self.model):
                self.model.save_weights(tmp)
        write_json(backup / STATE, {
            "epoch": epochs_done, "weights": weights, "best": self.best,
            "best_epoch": self.best_epoch, "wait": self.wait,
            "stopped_early": self.stopped_early, "finished": finished,
            "epochs_planned": self.cfg.train.epochs})
        for old in backup.glob("state-*.weights.h5"):
            if old.name != weights:
                old.unlink()


# --- training ----------------------------------------------------------------------


def train(cfg: Config, verbose: Any = "auto",
          split: pd.DataFrame | None = None) -> TrainResult:
    """Train ``cfg`` into a new run directory (``train.output_dir/run_name``).

    The data is read, cleaned and split before the folder is made, so bad data leaves
    nothing behind; a folder left by a failed start is reused. ``split`` (``id``,
    ``split``) imposes another run's split, so that runs compare on the same images.
    """
    replicas = _start_replicas(cfg)
    if replicas.restart and replicas.job_id:   # torchrun --max-restarts: pick it up
        earlier = find_job_run(cfg.train.output_dir, replicas.job_id)
        if earlier is not None:
            log.info("torchrun restart %d of job %s: resuming %s", replicas.restart,
                     replicas.job_id, earlier)
            return resume(earlier, verbose=verbose)
    cfg.data.data_dir = str(resolve_data_dir(cfg.data.data_dir).resolve())
    split = make_split(cfg) if split is None else _join_split(cfg, split, "the given split")
    run_dir = new_run_dir(cfg, replicas)
    if replicas.chief:
        write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        write_csv(run_dir / "split.csv", split[["id", "boneage", "male", "split"]])
    return _run(cfg, run_dir, split, None, verbose)


def _start_replicas(cfg: Config) -> Replicas:
    """``distribute`` set up; a process that is not the chief is kept from writing
    (every write through files.py would raise) and logs warnings only."""
    replicas = setup_replicas(cfg)
    if not replicas.chief:
        forbid_writes(f"{replicas.name}: only process 0, the chief, writes the run")
        logging.getLogger("boneage_keras").setLevel(logging.WARNING)
    return replicas


def find_job_run(output_dir: str | Path, job_id: str) -> Path | None:
    """The run a torchrun job (``job_id``, the same across its restarts) started."""
    import json

    for info in Path(output_dir).glob("*/run.json"):
        try:
            if json.loads(info.read_text()).get("distribute", {}).get("job_id") == job_id:
                return info.parent
        except (OSError, ValueError):
            continue
    return None


def resume(run_dir: str | Path, overrides: list[str] | None = None,
           verbose: Any = "auto") -> TrainResult:
    """Continue a run from its last finished epoch. ``overrides`` may change only
    ``RESUMABLE_KEYS``; a finished run continues only if ``train.epochs`` is raised."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "split.csv").is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml/split.csv); "
                          "pass a folder created by `boneage train`.")
    for text in overrides or []:
        section, key, _ = parse_override(text)
        if f"{section}.{key}" not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {text}: '{section}.{key}' cannot change when resuming "
                              f"{run_dir} (it would no longer be the same run); resumable "
                              "keys: " + ", ".join(RESUMABLE_KEYS) + ". Start a new run "
                              "for other changes.")
    cfg = load_config(run_dir / "config.yaml", overrides)
    replicas = _start_replicas(cfg)
    state = read_state(run_dir)
    done = state["epoch"] if state else 0
    if run_complete(state) and cfg.train.epochs <= done:
        how = "stopped early" if state["stopped_early"] else "finished"
        raise RunDirError(f"{run_dir} has {how} after {done} epoch(s) (best epoch "
                          f"{(state['best_epoch'] or 0) + 1}); to train further, resume with "
                          f"--set train.epochs=N for N > {done}.")
    if cfg.train.epochs <= done:
        raise RunDirError(f"--set train.epochs={cfg.train.epochs}: {run_dir} has already "
                          f"trained {done} epoch(s); choose more.")
    if state and cfg.train.epochs != state["epochs_planned"]:
        log.info("extending %s from %d to %d epochs", run_dir, state["epochs_planned"],
                 cfg.train.epochs)
    if replicas.chief:
        write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        for folder in (run_dir, run_dir / "backup"):   # half-written files of a killed run
            for leftover in folder.glob(f".*{TMP_MARK}*"):
                leftover.unlink()
    return _run(cfg, run_dir, saved_split(cfg, run_dir), state, verbose)


def _run(cfg: Config, run_dir: Path, split: pd.DataFrame, state: dict[str, Any] | None,
         verbose: Any) -> TrainResult:
    replicas = current_replicas()
    if not replicas.chief:
        return _fit(cfg, run_dir, split, state, verbose, replicas)
    handler = _attach_log_file(run_dir)
    started = _now()
    info = run_info(started, replicas, status="running")
    write_json(run_dir / "run.json", info)
    try:
        result = _fit(cfg, run_dir, split, state, verbose, replicas)
    except BaseException as err:
        write_json(run_dir / "run.json", {**info, "ended": _now(),
                                          "status": f"stopped: {type(err).__name__}"})
        if state is None and read_state(run_dir) is None:
            _remove_setup(run_dir, keep_log=not isinstance(err, TrainingInterrupted))
        raise
    finally:
        logging.getLogger("boneage_keras").removeHandler(handler)
        handler.close()
    write_json(run_dir / "run.json", {**info, "ended": _now(), "status": "finished",
                                      "epochs": result.epochs_run})
    return result


def _lost_contact(err: BaseException) -> bool:
    """Whether a distributed step failed because another process went away."""
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "peer",
                                         "collective", "heartbeat", "timed out",
                                         "unavailable", "socket"))


def _remove_setup(run_dir: Path, keep_log: bool) -> None:
    """Before any epoch finished: take back the files this run wrote, so the same
    run_name can be used again (the log stays when it explains a failure)."""
    for name in SETUP_FILES:
        if name == "train.log" and keep_log:
            continue
        (run_dir / name).unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def _fit(cfg: Config, run_dir: Path, split: pd.DataFrame, state: dict[str, Any] | None,
         verbose: Any, replicas: Replicas) -> TrainResult:
    from .loaders import make_loader

    with native_stderr_silenced():   # Keras seeds TensorFlow too, if it is installed
        keras.utils.set_random_seed(cfg.train.seed + (state["epoch"] if state else 0))
    if cfg.train.mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision_policy())
    try:
        log.info("run %s on the %s backend (%s)", run_dir, keras.backend.backend(),
                 ", ".join(devices()))
        train_df, val_df = split[split["split"] == "train"], split[split["split"] == "val"]
        labels = train_df["boneage"].to_numpy(dtype=np.float64)
        mean, std = float(labels.mean()), float(labels.std() or 1.0)
        with replicas.scope():
            model = compile_model(build_model(cfg, mean, std), cfg)
        with replicas.local_scope():
            twin = build_model(cfg, mean, std)
        start = 0
        if state is not None:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(run_dir / "backup" / state["weights"])
            start = state["epoch"]
            log.info("resuming at epoch %d (best so far: epoch %s, %s=%s; patience "
                     "waited %d)", start + 1,
                     None if state["best_epoch"] is None else state["best_epoch"] + 1,
                     MONITOR, state["best"], state["wait"])
        replicas.prepare_model(model)
        history = pd.DataFrame()
        if state is not None and (run_dir / "history.csv").is_file():
            history = pd.read_csv(run_dir / "history.csv")
        steps = cfg.train.steps_per_epoch
        reader = image_reader(cfg, split)
        train_data = make_loader(train_df, cfg, training=True, repeat=steps is not None,
                                 reader=reader, start_epoch=start, replicas=replicas)
        val_data = make_loader(val_df, cfg, training=False, reader=reader,
                               replicas=replicas)
        keeper = RunKeeper(run_dir, cfg, twin, state, history, replicas)
        callbacks: list[keras.callbacks.Callback] = []
        if cfg.train.bn_refresh_batches and not replicas.distributed:
            callbacks.append(RefreshBatchNorm(refresh_batches(train_df, cfg, reader)))
        callbacks += replicas.callbacks(model)
        t = cfg.train
        if t.lr_schedule == "cosine":  # before the keeper, so its rows carry the rate
            base = effective_learning_rate(cfg)
            callbacks.append(keras.callbacks.LearningRateScheduler(
                lambda epoch: cosine_learning_rate(epoch, base, t.epochs,
                                                   t.cosine_period_epochs, t.warmup_epochs,
                                                   t.min_learning_rate)))
        stopper = StopOnSignal()
        stopper.install()
        try:
            # shuffle=False: the loaders draw each epoch's order themselves
            model.fit(train_data, validation_data=val_data, epochs=t.epochs,
                      initial_epoch=start, steps_per_epoch=steps, shuffle=False,
                      callbacks=[stopper, *callbacks, keeper],
                      verbose=verbose if replicas.chief else 0)
        except Exception as err:
            if replicas.processes > 1 and _lost_contact(err):
                raise replicas.lost_process_error(err, run_dir) from None
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"training interrupted; everything up to the last finished epoch is in "
                f"{run_dir}. Continue with `boneage train --resume {run_dir}`.") from None
        finally:
            stopper.uninstall()
        epochs_done = len(keeper.history)
        keeper.save_state(epochs_done, finished=True)
    finally:
        if cfg.train.mixed_precision:
            keras.mixed_precision.set_global_policy("float32")
    if replicas.chief:
        plot_curves(run_dir / "history.csv", run_dir / "curves.png")
    best_row = keeper.history.loc[keeper.history["epoch"] == keeper.best_epoch].iloc[0]
    best = {k: float(best_row[k]) for k in keeper.history.columns if k.startswith("val_")}
    log.info("best epoch %d (in best.keras): %s", keeper.best_epoch + 1,
             ", ".join(f"{k}={v:.4g}" for k, v in best.items()))
    return TrainResult(run_dir=run_dir, epochs_run=epochs_done - start, best=best,
                       best_epoch=keeper.best_epoch + 1, stopped_early=keeper.stopped_early,
                       process=replicas.name if replicas.processes > 1 else None)
