"""Input pipelines over a cleaned table: ``tfdata`` and ``pydataset``.

Both decode with :func:`boneage_keras.images.load_image` (or a prepared cache's
reader), batch, augment training batches only, and yield ``(image, boneage)`` or, with
``model.use_sex``, ``({"image": image, "male": male}, boneage)``, plus a third element,
the sample weights, in tf.data always and in the PyDataset where ``train.age_balance``
weights training images; images are float32 0-255 of shape (batch, S, S, 1). Either
one feeds ``model.fit`` on every backend.

* ``tfdata`` needs TensorFlow (for input only on the torch and JAX backends: it is
  then kept off the GPU, see :func:`tensorflow_for_input`), and augments with the
  keras-cv engine.
* ``pydataset`` needs no TensorFlow: worker threads decode and augment batches ahead
  of the model, with any engine.
* ``auto`` (default) is ``tfdata`` where TensorFlow is installed and the augmentation
  engine is keras-cv, else ``pydataset``.

The training order and augmentation of epoch ``e`` are drawn from ``train.seed`` and
``e``: a resumed run (``start_epoch``) gets new shuffles and draws, not epoch 1's again.

    >>> train_data = make_loader(train_df, cfg, training=True)
    >>> model.fit(train_data, validation_data=make_loader(val_df, cfg, training=False))
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pandas as pd

from .augment import (
    Augmenter,
    active_stages,
    build_augmenter,
    layer_seed,
    resolve_engine,
)
from .backend import importable, tensorflow_for_input
from .config import Config, ConfigError, geometry
from .data import age_balance_weights
from .distribute import Replicas, shard
from .extras import install_hint
from .images import ImageError, decode_size, load_image
from .inputs import model_inputs
from .mixing import mix_numpy, mix_tf

log = logging.getLogger(__name__)
PREFETCH_BATCHES = 2
MIX_STREAM = 7919   # the mixing draws' own seed stream, apart from the augmentation's


def _pack(images: Any, male: Any, labels: Any, use_sex: bool) -> tuple[Any, Any]:
    return model_inputs(images, male, use_sex), labels


def _columns(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (df["path"].astype(str).to_numpy(),
            df["male"].astype(np.float32).to_numpy().reshape(-1, 1),
            df["boneage"].astype(np.float32).to_numpy())


def mixing(cfg: Config, training: bool) -> bool:
    """Whether this loader blends images (C-Mixup, ``augment.mixup_alpha``)."""
    return training and cfg.augment.mixup_alpha > 0


def _weights(labels: np.ndarray, cfg: Config, training: bool) -> np.ndarray:
    """Each image's loss weight: ``train.age_balance``'s for training, else 1."""
    power = cfg.train.age_balance if training else 0.0
    return age_balance_weights(labels, power)


class TolerantReader:
    """A reader that skips an image failing to decode mid-run (it passed cleaning, then
    changed or its disk failed) with a warning naming it, until more than ``limit``
    have failed: then the run stops with an error listing them."""

    def __init__(self, read: Callable[..., np.ndarray], limit: int) -> None:
        self.read, self.limit = read, limit
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, path: str, *args: Any, **kwargs: Any) -> np.ndarray | None:
        try:
            return self.read(path, *args, **kwargs)
        except ImageError as err:
            with self.lock:
                self.failures.append(str(path))
                count = len(self.failures)
            if count > self.limit:
                raise ImageError(f"{count} images failed to decode during this run (first: "
                                 f"{', '.join(self.failures[:3])}), more than "
                                 f"data.max_unreadable={self.limit}: fix or remove them, "
                                 "then resume.") from None
            log.warning("skipped an image that failed to decode: %s (%d so far, limit %d)",
                        err, count, self.limit)
            return None


def resolve_loader(cfg: Config, training: bool = True) -> str:
    """``data.loader`` with ``auto`` resolved; clear errors for combinations that
    cannot run here."""
    loader = cfg.data.loader
    has_tf = importable("tensorflow")
    augmenting = training and bool(active_stages(cfg.augment, cfg.data.image_size))
    engine = resolve_engine(cfg.augment.engine) if augmenting else None
    if loader == "auto":
        return "tfdata" if has_tf and engine in (None, "keras-cv") else "pydataset"
    if loader == "tfdata" and not has_tf:
        raise ConfigError("config key 'data.loader': 'tfdata' needs TensorFlow, which is "
                          f"not installed here: {install_hint('tensorflow')}, or set "
                          "data.loader=pydataset (or auto).")
    if loader == "tfdata" and engine in ("keras", "numpy"):
        raise ConfigError(f"config key 'augment.engine': {engine!r} augments in the pydataset "
                          "loader's worker threads; set data.loader=pydataset (or auto), "
                          "or augment.engine=keras-cv for tf.data.")
    return loader


def pipeline_options() -> Any:
    """tf.data options for every pipeline we build: autotuning off, deterministic.

    The autotune loop delayed the end of an epoch until its next wake-up
    (experiments/2026-11-22-input-pipeline-speed.md); parallelism is set explicitly
    instead (one call per CPU core, two batches prefetched). The parallel maps keep
    their order, so a seed gives the same batches every run.
    """
    tf = tensorflow_for_input()
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def parallel_calls() -> int:
    return max(1, os.cpu_count() or 1)


def make_tf_dataset(df: pd.DataFrame, cfg: Config, training: bool,
                    augmenter: Augmenter | None = None, repeat: bool = False,
                    reader: Callable[..., np.ndarray] = load_image,
                    start_epoch: int = 0) -> Any:
    """A batched, prefetched tf.data pipeline: parallel decode, then batch augmentation;
    batches are ``(inputs, boneage, weight)``, the weight 0 for an image that failed
    to decode mid-run (see :class:`TolerantReader`), else 1 or, training with
    ``train.age_balance``, its age bin's.

    ``reader(path, image_size, geometry, random_crop, center)`` gives one (S, S, 1)
    uint8 image:
    ``images.load_image`` (decode the file) or a prepared cache's ``load``.
    """
    tf = tensorflow_for_input()
    if augmenter is not None and augmenter.tf_function is None:
        raise ConfigError("config key 'augment.engine': tf.data needs the keras-cv engine "
                          "(set augment.engine=keras-cv, or data.loader=pydataset).")
    size, shape = cfg.data.image_size, geometry(cfg.data)
    random_crop = cfg.augment.random_crop
    cropping = training and random_crop      # else the central window, as in evaluation
    side = decode_size(size, random_crop) if cropping else size
    paths, male, labels = _columns(df)
    weights = _weights(labels, cfg, training)

    tolerant = TolerantReader(reader, cfg.data.max_unreadable)
    blank = np.zeros((side, side, 1), np.uint8)

    def decode(path: bytes) -> tuple[np.ndarray, bool]:
        image = tolerant(path.decode(), size, shape, random_crop, center=not cropping)
        return (blank, False) if image is None else (image, True)

    def load(path, sex, label, weight):
        image, ok = tf.numpy_function(decode, [path], (tf.uint8, tf.bool), stateful=False)
        image.set_shape((side, side, 1))
        ok.set_shape(())
        return image, tf.cast(ok, tf.float32) * weight, sex, label

    ds = tf.data.Dataset.from_tensor_slices((paths, male, labels, weights))
    if training:
        ds = ds.shuffle(len(df), seed=layer_seed(cfg.train.seed, start_epoch),
                        reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.with_options(pipeline_options())
    use_sex = cfg.model.use_sex
    augment = augmenter.tf_function if training and augmenter is not None else None
    mix = mixing(cfg, training)
    a = cfg.augment

    def finish(images, weight, sex, labels, seed=None):
        images = tf.cast(images, tf.float32)
        if augment is not None:
            images = augment(images, seed)
        if mix:
            images, labels, weight = mix_tf(
                images, sex if use_sex else None, labels, weight, a.mixup_alpha,
                a.mixup_sigma, tf.random.experimental.stateless_fold_in(seed, MIX_STREAM))
        # an image that failed to decode weighs 0 (filtering it out instead would hide
        # the epoch's length from fit)
        return (*_pack(images, sex, labels, use_sex), weight)

    ds = ds.map(load, num_parallel_calls=parallel_calls())
    ds = ds.batch(cfg.train.batch_size)
    if augment is None and not mix:
        ds = ds.map(finish, num_parallel_calls=parallel_calls())
    else:
        # Each batch's draws come from a seed of its own, paired with it from a seeded
        # stream that starts anew (and differently) with each pass over the data, like
        # the shuffle: reproducible however many batches an earlier iterator took
        # (Keras' fit opens one to look at the first batch, and drops it). The
        # keras-cv layers' generators are shared, so the map runs one batch at a time.
        seeds = tf.data.Dataset.random(seed=layer_seed(cfg.train.seed, start_epoch, 1),
                                       rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, seed: finish(*batch, seed=seed))
    return ds.prefetch(PREFETCH_BATCHES)


class BoneAgeDataset(keras.utils.PyDataset):
    """``keras.utils.PyDataset`` over the same decode and augmentation as tf.data.

    Worker threads decode (and augment) batches ahead of the model (``data.workers``).
    Training batches follow epoch ``e``'s order, a permutation drawn from
    (``train.seed``, ``e``); ``start_epoch`` is the first epoch this object serves.
    """

    def __init__(self, df: pd.DataFrame, cfg: Config, training: bool,
                 augmenter: Augmenter | None = None,
                 reader: Callable[..., np.ndarray] = load_image, start_epoch: int = 0,
                 replicas: Replicas | None = None, **kwargs: Any) -> None:
        super().__init__(workers=cfg.data.workers, use_multiprocessing=False,
                         max_queue_size=max(4, 2 * cfg.data.workers), **kwargs)
        self.paths, self.male, self.labels = _columns(df)
        self.weights = _weights(self.labels, cfg, training)
        self.weighted = bool((self.weights != 1).any())
        self.mixing = mixing(cfg, training)
        self.cfg, self.training = cfg, training
        self.reader = TolerantReader(reader, cfg.data.max_unreadable)
        self.cropping = training and cfg.augment.random_crop  # else the central window
        self.augmenter = augmenter if training else None
        self.epoch = start_epoch
        self._next_epoch = start_epoch
        # data parallel: this process's shard of every epoch, padded to equal steps
        self.replicas = replicas if replicas is not None and replicas.distributed else None
        self.order = self.epoch_order(start_epoch)
        self.positions = self._shard()

    def _shard(self) -> np.ndarray | None:
        if self.replicas is None:
            return None
        r = self.replicas
        return shard(self.order, self.cfg.train.batch_size, r.processes, r.index)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The image order of ``epoch`` (unshuffled for validation)."""
        if not self.training:
            return np.arange(len(self.paths))
        return np.random.default_rng([self.cfg.train.seed, epoch]).permutation(
            len(self.paths))

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.cfg.train.batch_size)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if self.positions is not None:
            return self._shard_batch(index)
        bs = self.cfg.train.batch_size
        idx = self.order[index * bs:(index + 1) * bs]
        decoded = [self._read(i) for i in idx]
        idx = np.array([i for i, image in zip(idx, decoded) if image is not None], int)
        if not len(idx):
            raise ImageError(f"no image of batch {index} decodes (first: "
                             f"{self.paths[self.order[index * bs]]}); check the data folder.")
        images = np.stack([image for image in decoded if image is not None]
                          ).astype(np.float32)
        if self.augmenter is not None:
            images = self.augmenter.augment_batch(images, self.epoch, index)
        labels, weights = self.labels[idx], self.weights[idx]
        if self.mixing:
            images, labels, weights = self._mix(images, self.male[idx], labels, weights, index)
        batch = _pack(images, self.male[idx], labels, self.cfg.model.use_sex)
        return (*batch, weights) if self.weighted else batch

    def _mix(self, images, male, labels, weights, batch: int):
        """C-Mixup of one batch, drawn from (seed, epoch, batch)."""
        a = self.cfg.augment
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, batch, MIX_STREAM])
        return mix_numpy(images, male if self.cfg.model.use_sex else None, labels, weights,
                         a.mixup_alpha, a.mixup_sigma, rng)

    def _read(self, i: int) -> np.ndarray | None:
        """Image ``i`` decoded (None if it failed, see :class:`TolerantReader`)."""
        d = self.cfg.data
        return self.reader(self.paths[i], d.image_size, geometry(d),
                           self.cfg.augment.random_crop, center=not self.cropping)

    def _shard_batch(self, index: int) -> tuple[Any, Any, np.ndarray]:
        """Step ``index`` of this process's shard: a full batch whose padding (and any
        image that failed to decode) is a blank with weight 0, so every process feeds
        the same shapes and the weights count each image of the split once."""
        r = self.replicas
        per = self.cfg.train.batch_size // r.processes
        d = self.cfg.data
        side = decode_size(d.image_size, self.cfg.augment.random_crop) \
            if self.cropping else d.image_size
        images = np.zeros((per, side, side, 1), np.float32)
        male = np.zeros((per, 1), np.float32)
        labels = np.zeros(per, np.float32)
        weights = np.zeros(per, np.float32)
        for j, i in enumerate(self.positions[index * per:(index + 1) * per]):
            if i < 0:
                continue
            image = self._read(i)
            if image is not None:
                images[j], male[j], labels[j], weights[j] = image, self.male[i], \
                    self.labels[i], self.weights[i]
        if self.augmenter is not None:   # each process its own draws
            images = self.augmenter.augment_batch(images, self.epoch,
                                                  index * r.processes + r.index)
        if self.mixing:
            images, labels, weights = self._mix(images, male, labels, weights,
                                                index * r.processes + r.index)
        return (*_pack(images, male, labels, self.cfg.model.use_sex), weights)

    def on_epoch_begin(self) -> None:
        if self.training:
            self.epoch = self._next_epoch
            self._next_epoch += 1
            self.order = self.epoch_order(self.epoch)
            self.positions = self._shard()


def make_loader(df: pd.DataFrame, cfg: Config, training: bool, repeat: bool = False,
                reader: Callable[..., np.ndarray] = load_image,
                start_epoch: int = 0, replicas: Replicas | None = None) -> Any:
    """The configured loader (``data.loader``) for one split; augments only if training.
    With several ``replicas`` it is the PyDataset, feeding this process's shard."""
    loader = resolve_loader(cfg, training)
    if replicas is not None and replicas.distributed and loader != "pydataset":
        if training:
            log.info("data parallel: the pydataset loader feeds each process its shard "
                     "(data.loader=%s is not used)", cfg.data.loader)
        loader = "pydataset"
    augmenter = None
    if training:
        augmenter = build_augmenter(cfg.augment, cfg.data.image_size, seed=cfg.train.seed,
                                    start_epoch=start_epoch)
    if training:
        log.info("input: %s loader, augmentation %s%s", loader,
                 f"{augmenter.engine} engine ({', '.join(augmenter.keys)})"
                 if augmenter is not None else "off",
                 f", C-Mixup (alpha {cfg.augment.mixup_alpha}, sigma "
                 f"{cfg.augment.mixup_sigma} months)" if mixing(cfg, training) else "")
    if loader == "pydataset":
        return BoneAgeDataset(df, cfg, training, augmenter, reader=reader,
                              start_epoch=start_epoch, replicas=replicas)
    return make_tf_dataset(df, cfg, training, augmenter, repeat=repeat, reader=reader,
                           start_epoch=start_epoch)
