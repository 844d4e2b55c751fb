"""Train a bone-age model and leave a complete run directory (``rundir.py``).

Building comes apart from running, as in flax's ImageNet example: ``create_model``
(compiled model and its uncompiled twin), ``restore_state`` (a resumed run's weights),
``create_loaders``, ``create_callbacks``, then ``fit_epochs`` runs ``model.fit`` and
``train_and_evaluate`` joins them. ``train`` starts a run, ``resume`` continues one from
its last finished epoch with the best value and the patience counter it had, and
extends a finished run only when asked (``train.epochs`` raised).

    >>> from boneage_keras.config import load_config
    >>> result = train(load_config("configs/default.yaml", ["train.epochs=3"]))
    >>> result = resume(result.run_dir, ["train.epochs=5"])     # two more epochs
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from .backend import devices, fuse_adam, fuse_ema, jit_setting, mixed_precision_policy
from .cache import reader_for
from .callbacks import (
    MONITOR,
    AveragedWeights,
    BestEpoch,
    HistoryCSV,
    NonFiniteLoss,
    RefreshBatchNorm,
    SaveModels,
    SaveState,
    SnapshotAverage,
    StopOnNonFiniteLoss,
    StopOnSignal,
)
from .config import (
    Config,
    ConfigError,
    config_to_yaml,
    geometry,
    load_config,
    parse_override,
)
from .console import native_stderr_silenced
from .data import resolve_data_dir
from .distribute import Replicas, effective_learning_rate
from .distribute import current as current_replicas
from .distribute import setup as setup_replicas
from .errors import BoneAgeError
from .files import TMP_MARK, forbid_writes, write_csv, write_json, write_text
from .losses import LabelDistributionTrainer, OrdinalTrainer
from .metrics import ToleranceAccuracy
from .model import build_model
from .plots import plot_curves
from .rundir import (
    RunDirError,
    attach_log_file,
    find_job_run,
    join_split,
    make_split,
    new_run_dir,
    now,
    read_state,
    remove_setup,
    run_complete,
    run_info,
    saved_split,
)

__all__ = ["NonFiniteLoss", "RunDirError", "StopOnSignal", "TrainResult",
           "TrainingInterrupted", "compile_model", "cosine_learning_rate",
           "learning_rate_at", "make_optimizer", "read_state", "resume", "run_complete", "train"]

log = logging.getLogger(__name__)
# what --resume may change: where the data is and how it is read, and how long to train
RESUMABLE_KEYS = ("train.epochs", "train.early_stopping_patience", "data.data_dir",
                  "data.workers", "data.use_cache", "data.cache_dir",
                  "distribute.strategy", "distribute.devices", "distribute.cpu_devices",
                  "distribute.timeout_s", "distribute.coordinator",
                  "distribute.num_processes", "distribute.process_id")


class TrainingInterrupted(BoneAgeError, RuntimeError):
    """Training stopped early by the user; the run can be resumed."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best: dict[str, float]  # the validation metrics of the epoch in best.keras
    best_epoch: int = 0     # 1-based
    stopped_early: bool = False
    process: str | None = None  # this process's name in a run of several processes
    chief: bool = True          # the process that writes the run


# --- building ----------------------------------------------------------------------


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


def swa_learning_rate(cfg: Config) -> float:
    """The rate of the weight-averaging epochs (``train.swa_learning_rate``, else a
    tenth of the run's rate)."""
    return cfg.train.swa_learning_rate or 0.1 * effective_learning_rate(cfg)


def learning_rate_at(epoch: int, cfg: Config) -> float:
    """The rate of ``epoch`` (0-based) as ``train`` schedules it: the cosine (or the
    constant rate) over all epochs; with ``train.swa_epochs`` N, the last N epochs at
    ``swa_learning_rate`` and the cosine over the epochs before, decaying to it."""
    t, base = cfg.train, effective_learning_rate(cfg)
    start = t.epochs - (t.swa_epochs or 0)
    if t.swa_epochs and epoch >= start:
        return swa_learning_rate(cfg)
    if t.lr_schedule == "constant":
        return base
    floor = max(swa_learning_rate(cfg), t.min_learning_rate) if t.swa_epochs \
        else t.min_learning_rate
    return cosine_learning_rate(epoch, base, start, t.cosine_period_epochs,
                                t.warmup_epochs, floor)


def make_optimizer(cfg: Config) -> keras.optimizers.Optimizer:
    """The configured optimizer at the (replica-scaled) learning rate."""
    t = cfg.train
    decay = t.weight_decay or None
    lr = effective_learning_rate(cfg)
    # train.ema_decay: Keras keeps the moving average (callbacks.AveragedWeights uses it)
    ema = {"use_ema": True, "ema_momentum": t.ema_decay} if t.ema_decay else {}
    if t.optimizer == "adamw":
        optimizer = fuse_adam(keras.optimizers.AdamW(lr, weight_decay=t.weight_decay, **ema))
    elif t.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=0.9, weight_decay=decay, **ema)
    else:
        optimizer = fuse_adam(keras.optimizers.Adam(lr, weight_decay=decay, **ema))
    return fuse_ema(optimizer)


def compile_model(model: keras.Model, cfg: Config) -> keras.Model:
    """Compile with the configured optimizer, loss, MAE/RMSE/tolerance-accuracy metrics.
    With ``train.loss: ldl`` (``coral``) the compiled model is a
    :class:`LabelDistributionTrainer` (:class:`OrdinalTrainer`) around ``model`` (the
    same layers and weights)."""
    t = cfg.train
    if t.loss == "ldl" and not isinstance(model, LabelDistributionTrainer):
        model = LabelDistributionTrainer(model, t.ldl_sigma, t.ldl_l1_weight)
    if t.loss == "coral" and not isinstance(model, OrdinalTrainer):
        model = OrdinalTrainer(model)
    # ldl, coral: the model's own compute_loss (LabelDistributionTrainer, OrdinalTrainer)
    loss = {"mae": "mean_absolute_error", "mse": "mean_squared_error",
            "huber": keras.losses.Huber(delta=12.0), "ldl": None, "coral": None}[t.loss]
    model.compile(
        optimizer=make_optimizer(cfg),
        loss=loss,
        # weighted: an image that failed to decode, or a data-parallel batch's padding,
        # comes with weight 0 and must not count
        weighted_metrics=[keras.metrics.MeanAbsoluteError(name="mae"),
                          keras.metrics.RootMeanSquaredError(name="rmse"),
                          ToleranceAccuracy(cfg.train.tolerance_months)],
        jit_compile=jit_setting(cfg.train.jit_compile),
    )
    return model


def create_model(cfg: Config, train_df: pd.DataFrame,
                 replicas: Replicas) -> tuple[keras.Model, keras.Model]:
    """The compiled model (output scaled to the training ages) and an uncompiled twin
    of it, which saves best.keras and last.keras without optimizer state."""
    labels = train_df["boneage"].to_numpy(dtype=np.float64)
    mean, std = float(labels.mean()), float(labels.std() or 1.0)
    with replicas.scope():
        model = compile_model(build_model(cfg, mean, std), cfg)
    with replicas.local_scope():
        twin = build_model(cfg, mean, std)
    return model, twin


def restore_state(model: keras.Model, run_dir: Path, state: dict[str, Any] | None,
                  monitor: str = MONITOR) -> int:
    """A resumed run's weights and optimizer state; returns the epoch to start at."""
    if state is None:
        return 0
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir / "backup" / state["weights"])
    log.info("resuming at epoch %d (best so far: epoch %s, %s=%s; patience waited %d)",
             state["epoch"] + 1,
             None if state["best_epoch"] is None else state["best_epoch"] + 1, monitor,
             state["best"], state["wait"])
    return state["epoch"]


def image_reader(cfg: Config, table: pd.DataFrame) -> Callable[..., np.ndarray]:
    """A prepared cache's reader when one fits the config, else decoding the files."""
    d = cfg.data
    return reader_for(table, d.data_dir, d.image_size, geometry(d), d.cache_dir,
                      d.use_cache)


def create_loaders(cfg: Config, split: pd.DataFrame, start: int, replicas: Replicas,
                   reader: Callable[..., np.ndarray]) -> tuple[Any, Any]:
    """The training loader (epochs drawn from ``start`` on) and the validation one."""
    from .loaders import make_loader

    train_df, val_df = split[split["split"] == "train"], split[split["split"] == "val"]
    repeat = cfg.train.steps_per_epoch is not None
    return (make_loader(train_df, cfg, training=True, repeat=repeat, reader=reader,
                        start_epoch=start, replicas=replicas),
            make_loader(val_df, cfg, training=False, reader=reader, replicas=replicas))


def refresh_batches(train_df: pd.DataFrame, cfg: Config,
                    reader: Callable[..., np.ndarray]) -> list[Any]:
    """``train.bn_refresh_batches`` batches of the model's training inputs (images, or
    the inputs dict with the sex; no more than an epoch trains on), drawn once (seeded),
    decoded without augmentation."""
    from .loaders import BoneAgeDataset

    t = cfg.train
    batches = min(t.bn_refresh_batches, t.steps_per_epoch or t.bn_refresh_batches)
    n = min(len(train_df), batches * t.batch_size)
    sample = train_df.sample(n=n, random_state=cfg.train.seed)
    data = BoneAgeDataset(sample, cfg, training=False, reader=reader)
    return [data[k][0] for k in range(len(data))]


@dataclass
class RunCallbacks:
    """What ``fit`` is given, with handles on the ones the run reads afterwards."""

    callbacks: list[keras.callbacks.Callback]
    stopper: StopOnSignal
    best: BestEpoch
    history: HistoryCSV
    state: SaveState


def create_callbacks(cfg: Config, run_dir: Path, model: keras.Model, twin: keras.Model,
                     state: dict[str, Any] | None, replicas: Replicas,
                     train_df: pd.DataFrame,
                     reader: Callable[..., np.ndarray]) -> RunCallbacks:
    """In order: the signal stop, the weight average in (``train.ema_decay``,
    ``train.swa_epochs``), the
    batch-norm refresh, the replicas' own, the learning-rate schedule (before the
    writers, so history rows carry the rate), the non-finite loss stop (before anything
    of an epoch is written), history, best epoch and early stopping, the models, the
    trained weights back, and the resumable state last."""
    t = cfg.train
    state = state or {}
    callbacks: list[keras.callbacks.Callback] = []
    stopper = StopOnSignal()
    callbacks.append(stopper)
    averaged: AveragedWeights | SnapshotAverage | None = None
    if t.ema_decay:
        averaged = AveragedWeights(model)
    elif t.swa_epochs:
        averaged = SnapshotAverage(model, t.epochs - t.swa_epochs, run_dir / "backup",
                                   state.get("epoch", 0))
    if averaged:
        callbacks.append(averaged.use_average)      # before the batch-norm refresh
    if t.bn_refresh_batches and not replicas.distributed:
        callbacks.append(RefreshBatchNorm(refresh_batches(train_df, cfg, reader)))
    callbacks += replicas.callbacks(model)
    if t.lr_schedule == "cosine" or t.swa_epochs:
        callbacks.append(keras.callbacks.LearningRateScheduler(
            lambda epoch: learning_rate_at(epoch, cfg)))
    history_csv = run_dir / "history.csv"
    past = pd.read_csv(history_csv) if state and history_csv.is_file() else pd.DataFrame()
    history = HistoryCSV(history_csv, past, writer=replicas.chief)
    best = BestEpoch(t.early_stopping_patience, state.get("best"), state.get("best_epoch"),
                     state.get("wait", 0), monitor=t.monitor)
    saver = SaveState(run_dir, best, t.epochs, replicas)
    callbacks += [StopOnNonFiniteLoss(), history, best,
                  SaveModels(run_dir, twin, best, replicas)]
    if averaged:
        callbacks.append(averaged.use_trained)      # the resumable state: trained weights
    callbacks.append(saver)
    return RunCallbacks(callbacks, stopper, best, history, saver)


# --- running -----------------------------------------------------------------------


@contextlib.contextmanager
def precision_and_seed(cfg: Config, start: int) -> Iterator[None]:
    """Seed everything from ``train.seed`` and the epoch a run starts at, and set the
    mixed-precision policy for the run (float32 again afterwards)."""
    with native_stderr_silenced():   # Keras seeds TensorFlow too, if it is installed
        keras.utils.set_random_seed(cfg.train.seed + start)
    if cfg.train.mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision_policy())
    try:
        yield
    finally:
        if cfg.train.mixed_precision:
            keras.mixed_precision.set_global_policy("float32")


def _lost_contact(err: BaseException) -> bool:
    """Whether a distributed step failed because another process went away."""
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "peer",
                                         "collective", "heartbeat", "timed out",
                                         "unavailable", "socket"))


def fit_epochs(cfg: Config, model: keras.Model, train_data: Any, val_data: Any,
               run: RunCallbacks, start: int, verbose: Any, replicas: Replicas,
               run_dir: Path) -> None:
    """``model.fit`` from epoch ``start``; Ctrl-C becomes a resumable stop and a lost
    process a one-line error."""
    run.stopper.install()
    try:
        # shuffle=False: the loaders draw each epoch's order themselves
        model.fit(train_data, validation_data=val_data, epochs=cfg.train.epochs,
                  initial_epoch=start, steps_per_epoch=cfg.train.steps_per_epoch,
                  shuffle=False, callbacks=run.callbacks,
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
        run.stopper.uninstall()


def train_and_evaluate(cfg: Config, run_dir: Path, split: pd.DataFrame,
                       state: dict[str, Any] | None, verbose: Any,
                       replicas: Replicas) -> TrainResult:
    """Build, restore, fit and report one run in ``run_dir``."""
    start_hint = state["epoch"] if state else 0
    with precision_and_seed(cfg, start_hint):
        log.info("run %s on the %s backend (%s)", run_dir, keras.backend.backend(),
                 ", ".join(devices()))
        train_df = split[split["split"] == "train"]
        model, twin = create_model(cfg, train_df, replicas)
        start = restore_state(model, run_dir, state, cfg.train.monitor)
        replicas.prepare_model(model)
        reader = image_reader(cfg, split)
        train_data, val_data = create_loaders(cfg, split, start, replicas, reader)
        run = create_callbacks(cfg, run_dir, model, twin, state, replicas, train_df, reader)
        fit_epochs(cfg, model, train_data, val_data, run, start, verbose, replicas, run_dir)
        epochs_done = len(run.history.history)
        run.state.save(epochs_done, finished=True)
    if replicas.chief:
        plot_curves(run_dir / "history.csv", run_dir / "curves.png")
    history, best_epoch = run.history.history, run.best.best_epoch
    best_row = history.loc[history["epoch"] == best_epoch].iloc[0]
    best = {k: float(best_row[k]) for k in history.columns if k.startswith("val_")}
    log.info("best epoch %d (in best.keras): %s", best_epoch + 1,
             ", ".join(f"{k}={v:.4g}" for k, v in best.items()))
    return TrainResult(run_dir=run_dir, epochs_run=epochs_done - start, best=best,
                       best_epoch=best_epoch + 1, stopped_early=run.best.stopped_early,
                       process=replicas.name if replicas.processes > 1 else None,
                       chief=replicas.chief)


def _start_replicas(cfg: Config) -> Replicas:
    """``distribute`` set up; a process that is not the chief is kept from writing
    (every write through files.py would raise) and logs warnings only."""
    replicas = setup_replicas(cfg)
    if not replicas.chief:
        forbid_writes(f"{replicas.name}: only process 0, the chief, writes the run")
        logging.getLogger("boneage_keras").setLevel(logging.WARNING)
    return replicas


def _run(cfg: Config, run_dir: Path, split: pd.DataFrame, state: dict[str, Any] | None,
         verbose: Any) -> TrainResult:
    """``train_and_evaluate`` with the run's log file and run.json around it; a start
    that fails before its first epoch takes back what it wrote."""
    replicas = current_replicas()
    if not replicas.chief:
        return train_and_evaluate(cfg, run_dir, split, state, verbose, replicas)
    handler = attach_log_file(run_dir)
    info = run_info(now(), replicas, status="running")
    write_json(run_dir / "run.json", info)
    try:
        result = train_and_evaluate(cfg, run_dir, split, state, verbose, replicas)
    except BaseException as err:
        write_json(run_dir / "run.json", {**info, "ended": now(),
                                          "status": f"stopped: {type(err).__name__}"})
        if state is None and read_state(run_dir) is None:
            remove_setup(run_dir, keep_log=not isinstance(err, TrainingInterrupted))
        raise
    finally:
        logging.getLogger("boneage_keras").removeHandler(handler)
        handler.close()
    write_json(run_dir / "run.json", {**info, "ended": now(), "status": "finished",
                                      "epochs": result.epochs_run})
    return result


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
    split = make_split(cfg) if split is None else join_split(cfg, split, "the given split")
    run_dir = new_run_dir(cfg, replicas)
    if replicas.chief:
        write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        write_csv(run_dir / "split.csv", split[["id", "boneage", "male", "split"]])
    return _run(cfg, run_dir, split, None, verbose)


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
