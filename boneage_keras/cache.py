"""A preprocessing cache: every image decoded once, gray, squared and resized to N.

    >>> prepare_cache("data/rsna-bone-age", size=256)      # or: boneage prepare
    data/rsna-bone-age/.boneage-cache/256-pad/{images.npy, index.csv, meta.json}

``images.npy`` is one uint8 array (rows, N, N), read memory-mapped; ``index.csv`` maps
ids to rows; ``meta.json`` records the settings, a fingerprint of the source images
(id, byte size, modification time) and how many rows are done, so an interrupted
``prepare`` resumes and a cache built from other images or settings is never reused.
A cache of size N serves any ``image_size`` <= N with the same geometry (``pad``,
``stretch``, or either after the hand crop): its
squares are resized again on the fly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import console
from .data import cache_root, load_dataset
from .errors import BoneAgeError
from .files import make_writable_dir, write_csv, write_json
from .images import center_crop, decode_size, load_image, read_gray, resize_gray

log = logging.getLogger(__name__)


class CacheError(BoneAgeError, RuntimeError):
    """The cache cannot be written where asked; the message says where to put it instead."""
CHUNK = 256


def fingerprint(table: pd.DataFrame) -> str:
    """Hash of (id, byte size, mtime) of every image: changes when any image does."""
    digest = hashlib.sha1()
    for image_id, path in sorted(zip(table["id"], table["path"])):
        stat = os.stat(path)
        digest.update(f"{image_id}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class ImageCache:
    """An opened, complete cache: ``load(path, ...)`` like ``images.load_image``."""

    folder: Path
    size: int
    geometry: str
    rows: dict[str, int]   # image path -> row
    images: np.ndarray     # memory-mapped (n, size, size) uint8

    @classmethod
    def open(cls, folder: Path, table: pd.DataFrame) -> ImageCache:
        meta = json.loads((folder / "meta.json").read_text())
        index = pd.read_csv(folder / "index.csv", dtype={"id": str})
        row_of_id = dict(zip(index["id"], index["row"]))
        rows = {p: int(row_of_id[i]) for i, p in zip(table["id"], table["path"])}
        images = np.load(folder / "images.npy", mmap_mode="r")
        return cls(folder, meta["size"], meta["geometry"], rows, images)

    def load(self, path: str, image_size: int, geometry: str = "pad",
             random_crop: bool = False, center: bool = True) -> np.ndarray:
        """The image as :func:`images.load_image` gives it (``geometry`` is the
        cache's own)."""
        arr = resize_gray(np.asarray(self.images[self.rows[path]]),
                          decode_size(image_size, random_crop), "stretch")
        if random_crop and center:
            arr = center_crop(arr, image_size)
        return arr[..., None]


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _write_meta(folder: Path, meta: dict) -> None:
    write_json(folder / "meta.json", meta)


def prepare_cache(data_dir: str | Path, size: int, geometry: str = "pad",
                  cache_dir: str | Path | None = None, strict: bool = False,
                  progress: bool = True) -> dict:
    """Build (or finish, or confirm) the cache of ``data_dir`` at ``size``; returns meta."""

    table, _, root = load_dataset(data_dir, strict=strict, cache_dir=cache_dir)
    folder = cache_root(root, cache_dir) / f"{size}-{geometry}"
    want = {"version": 2, "size": size, "geometry": geometry, "rows": len(table),
            "fingerprint": fingerprint(table)}
    meta = _read_meta(folder)
    if meta is not None and any(meta.get(k) != v for k, v in want.items()):
        log.warning("cache %s was built from other images or settings: rebuilding it", folder)
        shutil.rmtree(folder)
        meta = None
    if meta is not None and meta.get("complete"):
        log.info("cache %s is complete and current (%d images)", folder, len(table))
        return meta
    try:
        make_writable_dir(folder)
    except OSError as err:
        raise CacheError(f"cannot write the cache at {folder} ({err.strerror}); the data "
                         "folder may be read-only: pass --cache-dir DIR (and set "
                         "data.cache_dir=DIR when training).") from err
    done = meta["rows_done"] if meta else 0
    if meta is None:
        write_csv(folder / "index.csv", table[["id"]].assign(row=np.arange(len(table))))
        images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(table), size, size))
        meta = {**want, "rows_done": 0, "complete": False}
        _write_meta(folder, meta)
    else:
        images = np.load(folder / "images.npy", mmap_mode="r+")
        log.info("resuming cache %s at image %d of %d", folder, done, len(table))
    bar = console.progress(len(table), unit_name="image") if progress else None
    if bar is not None and done:
        bar.update(done)
    paths = table["path"].tolist()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for start in range(done, len(table), CHUNK):
            chunk = paths[start:start + CHUNK]
            decoded = pool.map(lambda p: resize_gray(read_gray(p), size, geometry), chunk)
            for offset, arr in enumerate(decoded):
                images[start + offset] = arr
            images.flush()
            meta["rows_done"] = start + len(chunk)
            _write_meta(folder, meta)
            if bar is not None:
                bar.update(meta["rows_done"])
    meta["complete"] = True
    _write_meta(folder, meta)
    return meta


def find_cache(table: pd.DataFrame, data_dir: str | Path, image_size: int, geometry: str,
               cache_dir: str | Path | None = None) -> ImageCache | None:
    """The smallest complete, current cache that serves ``image_size`` and ``geometry``."""
    root = cache_root(data_dir, cache_dir)
    if not root.is_dir():
        return None
    candidates = []
    for folder in root.iterdir():
        meta = _read_meta(folder)
        if (meta and meta.get("complete") and meta.get("geometry") == geometry
                and meta.get("size", 0) >= image_size):
            candidates.append((meta["size"], folder, meta))
    if not candidates:
        return None
    everything = load_dataset(data_dir, check_images=False)[0]
    for _, folder, meta in sorted(candidates, key=lambda c: c[0]):
        index = pd.read_csv(folder / "index.csv", dtype={"id": str})
        ids = set(index["id"])
        if not set(table["id"]) <= ids:
            continue
        # each cache is checked against the images it was built from, now
        if meta["fingerprint"] != fingerprint(everything[everything["id"].isin(ids)]):
            log.warning("cache %s no longer matches the images (changed files): not used; "
                        "run `boneage prepare` again", folder)
            continue
        return ImageCache.open(folder, table)
    return None


def reader_for(table: pd.DataFrame, data_dir: str | Path | None, image_size: int,
               geometry: str, cache_dir: str | Path | None = None, use_cache: bool = True):
    """``load(path, image_size, geometry, random_crop)`` from a fitting cache, else
    from the files; the log says which."""
    if use_cache and data_dir:
        cache = find_cache(table, data_dir, image_size, geometry, cache_dir)
        if cache is not None:
            log.info("images: from the cache %s (%d px, %s)", cache.folder, cache.size,
                     cache.geometry)
            return cache.load
    log.info("images: decoding the original files (no prepared cache fits; see "
             "`boneage prepare`)")
    return load_image
