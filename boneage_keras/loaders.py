"""Input pipelines over a cleaned table: ``tfdata`` (default) and ``pydataset``.

Both decode with :func:`boneage_keras.images.load_image`, batch, augment training
batches only, and yield ``(image, boneage)`` or, with ``model.use_sex``,
``({"image": image, "male": male}, boneage)``; images are float32 0-255 of shape
(batch, S, S, 1). Either one feeds ``model.fit`` on the torch and TensorFlow backends.

    >>> train_data = make_loader(train_df, cfg, training=True)
    >>> model.fit(train_data, validation_data=make_loader(val_df, cfg, training=False))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from .augment import build_augmenter
from .config import Config
from .images import decode_size, load_image


def _pack(images: Any, male: Any, labels: Any, use_sex: bool) -> tuple[Any, Any]:
    if use_sex:
        return {"image": images, "male": male}, labels
    return images, labels


def _columns(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (df["path"].astype(str).to_numpy(),
            df["male"].astype(np.float32).to_numpy().reshape(-1, 1),
            df["boneage"].astype(np.float32).to_numpy())


PREFETCH_BATCHES = 2


def pipeline_options(deterministic: bool = True) -> tf.data.Options:
    """tf.data options for every pipeline we build, autotuning off.

    Measured (TensorFlow backend, 2-core CPU, ResNet50 64 px batch 16, 10-step epochs):
    with autotuning on, about one `fit` epoch in two ended ~6 s late (the epoch took
    20.48 s for 13-14 s of steps: tf.data's autotune loop, which wakes on a doubling
    period, held the iterator's teardown), so fit cost 1.4x train_on_batch; with it off,
    fit / train_on_batch = 0.97 over 6 of 6 epochs. Parallelism is set explicitly
    instead: one decode/augment call per CPU core, two batches prefetched.
    """
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = False
    return options


def parallel_calls() -> int:
    return max(1, os.cpu_count() or 1)


def make_tf_dataset(df: pd.DataFrame, cfg: Config, training: bool,
                    augment: Callable | None = None, repeat: bool = False,
                    reader: Callable[..., np.ndarray] = load_image) -> tf.data.Dataset:
    """A batched, prefetched tf.data pipeline: parallel decode, then batch augmentation.

    ``reader(path, size, resize, crop, center)`` gives one (S, S, 1) uint8 image:
    ``images.load_image`` (decode the file) or a prepared cache's ``load``.
    """
    size, resize, crop = cfg.data.image_size, cfg.data.resize, cfg.augment.random_crop
    random_crop = training and crop
    side = decode_size(size, crop) if random_crop else size
    paths, male, labels = _columns(df)

    def decode(path: bytes) -> np.ndarray:
        return reader(path.decode(), size, resize, crop, center=not random_crop)

    def load(path, sex, label):
        image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        image.set_shape((side, side, 1))
        return image, sex, label

    ds = tf.data.Dataset.from_tensor_slices((paths, male, labels))
    if training:
        ds = ds.shuffle(len(df), seed=cfg.train.seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.with_options(pipeline_options(deterministic=not training))
    ds = ds.map(load, num_parallel_calls=parallel_calls())
    ds = ds.batch(cfg.train.batch_size)
    ds = ds.map(lambda x, s, y: (tf.cast(x, tf.float32), s, y))
    if training and augment is not None:
        ds = ds.map(lambda x, s, y: (augment(x), s, y), num_parallel_calls=parallel_calls())
    use_sex = cfg.model.use_sex
    ds = ds.map(lambda x, s, y: _pack(x, s, y, use_sex))
    return ds.prefetch(PREFETCH_BATCHES)


class BoneAgeDataset(keras.utils.PyDataset):
    """``keras.utils.PyDataset`` over the same decode and augmentation as tf.data.

    Worker threads decode batches ahead of the model (``data.workers``); training
    data is reshuffled every epoch from ``train.seed``.
    """

    def __init__(self, df: pd.DataFrame, cfg: Config, training: bool,
                 augment: Callable | None = None,
                 reader: Callable[..., np.ndarray] = load_image, **kwargs: Any) -> None:
        super().__init__(workers=cfg.data.workers, use_multiprocessing=False,
                         max_queue_size=max(4, 2 * cfg.data.workers), **kwargs)
        self.paths, self.male, self.labels = _columns(df)
        self.cfg, self.training, self.reader = cfg, training, reader
        self.random_crop = training and cfg.augment.random_crop
        self.augment = None
        if training and augment is not None:
            # one trace for every batch size (the last batch is smaller), shared by workers
            spec = tf.TensorSpec([None, None, None, 1], tf.float32)
            self.augment = tf.function(augment, input_signature=[spec])
        self.rng = np.random.default_rng(cfg.train.seed)
        self.order = np.arange(len(self.paths))
        if training:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.cfg.train.batch_size)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        bs = self.cfg.train.batch_size
        idx = self.order[index * bs:(index + 1) * bs]
        d = self.cfg.data
        images = np.stack([
            self.reader(self.paths[i], d.image_size, d.resize, self.cfg.augment.random_crop,
                       center=not self.random_crop)
            for i in idx
        ]).astype(np.float32)
        if self.augment is not None:
            images = self.augment(tf.convert_to_tensor(images)).numpy()
        return _pack(images, self.male[idx], self.labels[idx], self.cfg.model.use_sex)

    def on_epoch_end(self) -> None:
        if self.training:
            self.rng.shuffle(self.order)


def make_loader(df: pd.DataFrame, cfg: Config, training: bool, repeat: bool = False,
                reader: Callable[..., np.ndarray] = load_image) -> Any:
    """The configured loader (``data.loader``) for one split; augments only if training."""
    augment = None
    if training:
        augment = build_augmenter(cfg.augment, cfg.data.image_size, seed=cfg.train.seed)
    if cfg.data.loader == "pydataset":
        return BoneAgeDataset(df, cfg, training, augment, reader=reader)
    return make_tf_dataset(df, cfg, training, augment, repeat=repeat, reader=reader)
