"""The preprocessing cache (`cli.py prepare`): built once, resumable, never stale."""

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli_batch

import boneage_keras.cache as cache_mod
from boneage_keras.cache import CacheError, find_cache, prepare_cache
from boneage_keras.data import load_dataset
from boneage_keras.images import load_image, read_gray, resize_gray

N_IMAGES = 10


@pytest.fixture
def small_data(sample_dir, tmp_path, monkeypatch):
    """A flat data folder with 10 of the real full-size radiographs (symlinked); its
    cache goes to the default place, DATA_DIR/.boneage-cache."""
    monkeypatch.delenv("BONEAGE_CACHE_DIR")
    labels = pd.read_csv(sample_dir / "labels.csv").head(N_IMAGES)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for image_id in labels["id"]:
        (data / "images" / f"{image_id}.png").symlink_to(
            sample_dir / "images" / f"{image_id}.png")
    labels.to_csv(data / "labels.csv", index=False)
    return data


def _expected(table, size, resize="pad"):
    return np.stack([resize_gray(read_gray(p), size, resize) for p in table["path"]])


def test_prepare_writes_one_row_per_image(small_data):
    meta = prepare_cache(small_data, size=64, progress=False)
    folder = small_data / ".boneage-cache" / "64-pad"
    assert meta["complete"] and meta["rows"] == N_IMAGES
    images = np.load(folder / "images.npy")
    assert images.shape == (N_IMAGES, 64, 64) and images.dtype == np.uint8
    table = load_dataset(small_data)[0]
    index = pd.read_csv(folder / "index.csv", dtype={"id": str})
    assert list(index["id"]) == list(table["id"])
    np.testing.assert_array_equal(images, _expected(table, 64))


def test_interrupted_prepare_resumes_where_it_stopped(small_data, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK", 4)
    calls = []

    def flaky_read(path):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return read_gray(path)

    monkeypatch.setattr(cache_mod, "read_gray", flaky_read)
    monkeypatch.setattr(cache_mod, "ThreadPoolExecutor", _SerialPool)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(small_data, size=48, progress=False)
    meta = json.loads((small_data / ".boneage-cache" / "48-pad" / "meta.json").read_text())
    assert meta["rows_done"] == 4 and not meta["complete"]
    calls.clear()
    monkeypatch.setattr(cache_mod, "read_gray", lambda p: calls.append(p) or read_gray(p))
    meta = prepare_cache(small_data, size=48, progress=False)
    assert meta["complete"] and len(calls) == N_IMAGES - 4   # only what was missing
    images = np.load(small_data / ".boneage-cache" / "48-pad" / "images.npy")
    np.testing.assert_array_equal(images, _expected(load_dataset(small_data)[0], 48))
    calls.clear()
    prepare_cache(small_data, size=48, progress=False)       # complete: nothing to do
    assert calls == []


class _SerialPool:
    """ThreadPoolExecutor stand-in that maps lazily in order (a deterministic failure)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return (fn(item) for item in items)


def test_changed_images_are_detected_never_reused(small_data, sample_dir, caplog):
    prepare_cache(small_data, size=64, progress=False)
    table = load_dataset(small_data)[0]
    assert find_cache(table, small_data, 64, "pad") is not None
    # replace one image by another radiograph: same id, different file
    target = small_data / "images" / f"{table['id'].iloc[0]}.png"
    target.unlink()
    other = max((sample_dir / "images").glob("*.png"))
    shutil.copy(other, target)
    with caplog.at_level(logging.WARNING, logger="boneage_keras"):
        assert find_cache(table, small_data, 64, "pad") is None
    assert "no longer matches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="boneage_keras"):
        prepare_cache(small_data, size=64, progress=False)
    assert "rebuilding" in caplog.text
    images = np.load(small_data / ".boneage-cache" / "64-pad" / "images.npy")
    np.testing.assert_array_equal(images[0], resize_gray(read_gray(other), 64, "pad"))
    assert find_cache(table, small_data, 64, "pad") is not None


def test_cache_serves_smaller_sizes_of_the_same_resize_mode(small_data):
    prepare_cache(small_data, size=64, progress=False)
    table = load_dataset(small_data)[0]
    cache = find_cache(table, small_data, 40, "pad")
    assert cache is not None and cache.size == 64
    path = table["path"].iloc[0]
    from_cache = cache.load(path, 40, "pad")
    direct = load_image(path, 40, "pad")
    assert from_cache.shape == direct.shape == (40, 40, 1)
    assert np.abs(from_cache.astype(float) - direct.astype(float)).mean() < 6
    assert find_cache(table, small_data, 96, "pad") is None        # too small
    assert find_cache(table, small_data, 40, "stretch") is None    # other resize mode


def test_two_caches_over_different_ids_side_by_side(small_data):
    labels = pd.read_csv(small_data / "labels.csv", dtype={"id": str})
    labels.head(5).to_csv(small_data / "labels.csv", index=False)
    prepare_cache(small_data, size=48, progress=False)           # ids 1-5 only
    labels.to_csv(small_data / "labels.csv", index=False)
    prepare_cache(small_data, size=64, progress=False)           # all ten
    table = load_dataset(small_data)[0]
    first, last = table.head(5), table.tail(5)
    assert find_cache(first, small_data, 40, "pad").size == 48  # the smallest that fits
    assert find_cache(last, small_data, 40, "pad").size == 64   # 48 lacks these ids
    # each cache is checked against its own images: one of the first five changes
    # (a copy replaces the link: the shared sample itself is never touched)
    changed = small_data / "images" / f"{first['id'].iloc[1]}.png"
    data = changed.read_bytes()
    changed.unlink()
    changed.write_bytes(data)
    assert find_cache(first, small_data, 40, "pad") is None     # both hold it: stale
    assert find_cache(last, small_data, 40, "pad") is None      # 64 holds it too


def test_unwritable_cache_location_is_a_clear_error(small_data, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="--cache-dir"):
        prepare_cache(small_data, size=32, cache_dir=blocker / "cache", progress=False)


def test_train_and_evaluate_use_a_prepared_cache(sample_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    common = ["train", "--config", "configs/default.yaml", "--data-dir", str(sample_dir),
              "--set", "model.backbone=resnet18", "--set", "model.weights=none",
              "--set", "data.image_size=64", "--set", "train.epochs=1",
              "--set", "train.batch_size=16", "--set", f"train.output_dir={tmp_path}",
              "--set", f"data.cache_dir={cache_dir}"]
    # prepare, then train and evaluate, in one fresh process
    out, cached, evaluated = run_cli_batch([
        ["prepare", "--data-dir", sample_dir, "--size", "96", "--cache-dir", cache_dir],
        [*common, "--set", "train.run_name=cached"],
        ["evaluate", tmp_path / "cached"]])
    assert out.returncode == cached.returncode == evaluated.returncode == 0, \
        cached.stderr[-3000:] + evaluated.stderr[-3000:]
    assert "cache ready: 60 images at 96 px" in out.stdout
    assert (cache_dir / "96-pad" / "images.npy").is_file()
    assert "images: from the cache" in cached.stderr
    assert (tmp_path / "cached" / "best.keras").is_file()
    assert "images: from the cache" in evaluated.stderr
