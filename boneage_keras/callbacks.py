"""The callbacks ``train`` gives ``fit``, one job each.

Keras' own ``EarlyStopping``, ``TerminateOnNaN``, ``CSVLogger`` and ``ModelCheckpoint``
do not behave as a run directory needs: a resumed run must keep its best value and
early stopping's wait count (``BestEpoch`` reads and hands them to the saved state),
every file is replaced atomically rather than appended to or overwritten in place
(``HistoryCSV``, ``SaveModels``, ``SaveState``), ``best.keras`` and ``last.keras`` carry
no optimizer state, and the first non-finite loss must stop the run with an error
before anything of that epoch is written (``StopOnNonFiniteLoss``).
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from .backend import moving_averages
from .distribute import Replicas
from .errors import BoneAgeError
from .files import replacing, write_csv, write_json
from .model import refresh_batchnorm
from .rundir import STATE

log = logging.getLogger(__name__)
MONITOR = "val_tolerance_accuracy"   # what picks best.keras and stops early, by default
LOWER_IS_BETTER = ("val_mae", "val_rmse")



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


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise :class:`NonFiniteLoss` at the first NaN or infinite loss, naming the epoch
    and batch; placed before the writers, nothing of that epoch is saved."""

    async_safe = True   # the batch hook only reads the loss

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(
                f"training stopped: the loss became {float(loss)} at epoch "
                f"{self.epoch + 1}, batch {batch + 1}. Nothing of this epoch was saved; "
                "lower train.learning_rate, check the labels (data.age_range) or turn "
                "off train.mixed_precision, then resume or retrain.")

    def on_epoch_end(self, epoch, logs=None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"training stopped: the epoch {epoch + 1} loss is "
                                f"{float(loss)}; nothing of this epoch was saved. Lower "
                                "train.learning_rate or check the labels.")


class RefreshBatchNorm(keras.callbacks.Callback):
    """Before each validation, recompute the backbone's batch-norm statistics from a
    fixed sample of unaugmented training images (``batches``) with the current weights
    (``model.refresh_batchnorm``), so that validation, best.keras and last.keras use
    statistics that match their weights."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        super().__init__()
        self.batches = batches

    def on_test_begin(self, logs=None) -> None:
        refresh_batchnorm(self.model, self.batches)


class _SwappedWeights:
    """Puts averaged weights in the model for validation and saving, and the trained
    weights back for training and the resumable state.

    ``use_average`` (listed before :class:`RefreshBatchNorm`) puts the average in the
    model when validation begins, or at the epoch's end without one; ``use_trained``
    (listed between :class:`SaveModels` and :class:`SaveState`) puts the trained
    weights back at the epoch's end. Subclasses say which variables are averaged
    (``_variables``), what the average is once this epoch's trained values are known
    (``_average_of``), and what happens after the trained weights are back
    (``_restored``).
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.epoch = 0
        self.trained: list[np.ndarray] | None = None
        self.use_average = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs=None: setattr(self, "epoch", epoch),
            on_test_begin=lambda logs=None: self._use_average(),
            on_epoch_end=lambda epoch, logs=None: self._use_average())
        self.use_trained = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs=None: self._use_trained())

    def _active(self) -> bool:
        return True

    def _variables(self) -> list:
        raise NotImplementedError

    def _average_of(self, trained: list[np.ndarray]) -> list:
        raise NotImplementedError

    def _restored(self) -> None:
        pass

    def _use_average(self) -> None:
        if self.trained is not None or not self._active():
            return
        variables = self._variables()
        self.trained = [keras.ops.convert_to_numpy(v) for v in variables]
        for variable, average in zip(variables, self._average_of(self.trained)):
            variable.assign(average)

    def _use_trained(self) -> None:
        if self.trained is None:
            return
        for variable, weight in zip(self._variables(), self.trained):
            variable.assign(weight)
        self.trained = None
        self._restored()


class AveragedWeights(_SwappedWeights):
    """With ``train.ema_decay``: validation, the batch-norm refresh before it,
    ``best.keras`` and ``last.keras`` see the optimizer's exponential moving average of
    ``model``'s weights; training and ``backup/`` (the resumable state, whose optimizer
    state holds the averages) see the trained weights. Keras' ``SwapEMAWeights``
    cannot do both: with ``swap_on_epoch`` the resumable state would hold the weights
    swapped.
    """

    def _variables(self) -> list:
        return [variable for variable, _ in moving_averages(self.model.optimizer)]

    def _average_of(self, trained: list[np.ndarray]) -> list:
        return [average for _, average in moving_averages(self.model.optimizer)]


class SnapshotAverage(_SwappedWeights):
    """With ``train.swa_epochs`` (stochastic weight averaging, Izmailov et al. 2018):
    from epoch ``start`` (0-based) on, the trainable weights at each epoch's end join
    an equal-weight average. Validation, the batch-norm refresh before it,
    ``best.keras`` and ``last.keras`` see the average; training and ``backup/`` see
    the trained weights, as with :class:`AveragedWeights`.

    ``backup/swa-NNNN.npz`` holds the average after NNNN epochs, written before
    ``state.json`` names that epoch, so a resumed run (``epochs_done``) continues the
    average its state belongs to. A run extended so that the averaging epochs move
    starts its average again.
    """

    def __init__(self, model: keras.Model, start: int, backup: Path,
                 epochs_done: int = 0) -> None:
        super().__init__(model)
        self.start, self.backup = start, backup
        self.epoch = epochs_done
        self.average: list[np.ndarray] = []
        self.count = 0
        saved = backup / self.file(epochs_done)
        if epochs_done > start and saved.is_file():
            with np.load(saved) as npz:
                if int(npz["start"]) == start:
                    self.count = int(npz["count"])
                    self.average = [npz[f"w{i}"] for i in range(len(npz.files) - 2)]
                else:
                    log.info("the averaged epochs moved (from epoch %d to %d): the "
                             "weight average starts again", int(npz["start"]) + 1,
                             start + 1)

    @staticmethod
    def file(epochs_done: int) -> str:
        return f"swa-{epochs_done:04d}.npz"

    def _active(self) -> bool:
        return self.epoch >= self.start

    def _variables(self) -> list:
        return self.model.trainable_variables

    def _average_of(self, trained: list[np.ndarray]) -> list:
        if self.count == 0:
            self.average = [w.copy() for w in trained]
        else:
            for average, weight in zip(self.average, trained):
                average += (weight - average) / (self.count + 1)
        self.count += 1
        return self.average

    def _restored(self) -> None:
        name = self.file(self.epoch + 1)
        self.backup.mkdir(exist_ok=True)
        with replacing(self.backup / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, start=self.start, count=self.count,
                     **{f"w{i}": w for i, w in enumerate(self.average)})
        for old in self.backup.glob("swa-*.npz"):   # this one and the one state.json names
            if old.name not in (name, self.file(self.epoch)):
                old.unlink()


class BestEpoch(keras.callbacks.Callback):
    """Which epoch is best by ``monitor`` (the highest ``val_tolerance_accuracy``, the
    lowest ``val_mae`` or ``val_rmse``, or ``last``: every epoch beats the ones
    before), and early stopping after ``patience`` epochs without a better one.
    ``best``, ``best_epoch`` (0-based) and ``wait`` start from a resumed run's state."""

    async_safe = True

    def __init__(self, patience: int | None, best: float | None = None,
                 best_epoch: int | None = None, wait: int = 0,
                 monitor: str = MONITOR) -> None:
        super().__init__()
        self.patience, self.best, self.best_epoch, self.wait = patience, best, best_epoch, wait
        self.monitor = monitor
        self.improved = False
        self.stopped_early = False

    def better(self, value: float) -> bool:
        if self.best is None or self.monitor == "last":
            return True
        return value < self.best if self.monitor in LOWER_IS_BETTER else value > self.best

    def on_epoch_end(self, epoch, logs=None) -> None:
        value = epoch if self.monitor == "last" else (logs or {}).get(self.monitor)
        self.improved = value is not None and self.better(value)
        if self.improved:
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
        else:
            self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.stopped_early = True
            self.model.stop_training = True
            log.info("early stopping: no better %s for %d epochs (best epoch %d)",
                     self.monitor, self.wait, self.best_epoch + 1)


class HistoryCSV(keras.callbacks.Callback):
    """``history.csv`` rewritten after each epoch, one row per epoch; a resumed run's
    rows from the resumed epoch on are replaced."""

    async_safe = True

    def __init__(self, path: Path, history: pd.DataFrame, writer: bool = True) -> None:
        super().__init__()
        self.path, self.history, self.writer = path, history, writer

    def on_epoch_end(self, epoch, logs=None) -> None:
        row = pd.DataFrame([{"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}])
        kept = self.history[self.history["epoch"] < epoch] if len(self.history) else None
        self.history = row if kept is None else pd.concat([kept, row], ignore_index=True)
        if self.writer:
            write_csv(self.path, self.history)


class SaveModels(keras.callbacks.Callback):
    """``last.keras`` after every epoch, and ``best.keras`` when :class:`BestEpoch` says
    the epoch is the best so far: the weights copied into ``twin``, an uncompiled copy
    of the model, so neither file carries optimizer state. The model is serialized
    once per epoch; a best epoch's ``best.keras`` is a copy of that ``last.keras``
    (with ``train.monitor: last``, every epoch)."""

    async_safe = True

    def __init__(self, run_dir: Path, twin: keras.Model, best: BestEpoch,
                 replicas: Replicas) -> None:
        super().__init__()
        self.run_dir, self.twin, self.best, self.replicas = run_dir, twin, best, replicas

    def _save(self, name: str) -> None:
        with self.replicas.local_values(self.model):
            self.twin.set_weights(self.model.get_weights())
            with replacing(self.run_dir / name) as tmp:
                self.twin.save(tmp)

    def on_epoch_end(self, epoch, logs=None) -> None:
        if not self.replicas.chief:
            return
        self._save("last.keras")
        if self.best.improved:
            with replacing(self.run_dir / "best.keras") as tmp:
                shutil.copyfile(self.run_dir / "last.keras", tmp)


class SaveState(keras.callbacks.Callback):
    """``backup/``: the weights with the optimizer state, then ``state.json`` naming
    them with the epoch, the best value and early stopping's wait, so ``resume``
    continues exactly. The order matters: a kill between the two leaves state.json
    naming the previous, complete file."""

    async_safe = True

    def __init__(self, run_dir: Path, best: BestEpoch, epochs_planned: int,
                 replicas: Replicas) -> None:
        super().__init__()
        self.backup, self.best, self.replicas = run_dir / "backup", best, replicas
        self.epochs_planned = epochs_planned

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.save(epoch + 1)

    def save(self, epochs_done: int, finished: bool = False) -> None:
        if not self.replicas.chief:
            return
        self.backup.mkdir(exist_ok=True)
        weights = f"state-{epochs_done:04d}.weights.h5"
        if not (self.backup / weights).is_file() or not finished:
            with replacing(self.backup / weights) as tmp, \
                    self.replicas.local_values(self.model):
                self.model.save_weights(tmp)
        b = self.best
        write_json(self.backup / STATE, {
            "epoch": epochs_done, "weights": weights, "best": b.best,
            "best_epoch": b.best_epoch, "wait": b.wait, "stopped_early": b.stopped_early,
            "finished": finished, "epochs_planned": self.epochs_planned})
        for old in self.backup.glob("state-*.weights.h5"):
            if old.name != weights:
                old.unlink()
