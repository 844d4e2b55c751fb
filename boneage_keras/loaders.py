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
    options = tf.data.Options()
    options.deterministic = not training
    ds = ds.with_options(options)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(cfg.train.batch_size)
    ds = ds.map(lambda x, s, y: (tf.cast(x, tf.float32), s, y))
    if training and augment is not None:
        ds = ds.map(lambda x, s, y: (augment(x), s, y), num_parallel_calls=tf.data.AUTOTUNE)
    use_sex = cfg.model.use_sex
    ds = ds.map(lambda x, s, y: _pack(x, s, y, use_sex))
    return ds.prefetch(tf.data.AUTOTUNE)


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
