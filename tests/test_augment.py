import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from boneage_keras.augment import SaltAndPepper, build_augmenter
from boneage_keras.config import AugmentConfig, load_config
from boneage_keras.images import load_image
from boneage_keras.loaders import BoneAgeDataset, make_tf_dataset

SIZE = 64
OFF = {"horizontal_flip": False, "rotation_degrees": 0, "translation": 0, "scale": None,
       "shear": 0, "brightness": 0, "contrast": None, "blur_probability": 0,
       "salt_pepper": None, "random_crop": False}


@pytest.fixture(scope="module")
def batch(bulk_dir):
    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str}).head(16)
    images = [load_image(bulk_dir / "images" / f"{i}.png", SIZE) for i in labels["id"]]
    return np.stack(images).astype(np.float32)


def _augment(batch, seed=1, **stage):
    fn = build_augmenter(AugmentConfig(**{**OFF, **stage}), SIZE, seed=seed)
    assert fn is not None
    return tf.function(fn)(tf.convert_to_tensor(batch)).numpy()


def test_all_off_means_no_augmenter():
    assert build_augmenter(AugmentConfig(**OFF), SIZE) is None


def test_flip_mirrors_some_images(batch):
    out = _augment(batch, horizontal_flip=True)
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, batch)]
    same = [np.array_equal(o, x) for o, x in zip(out, batch)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


@pytest.mark.parametrize("stage", [{"rotation_degrees": 15}, {"translation": 0.1},
                                   {"scale": [0.9, 1.1]}, {"shear": 0.2}])
def test_geometric_stages_move_pixels(batch, stage):
    out = _augment(batch, **stage)
    assert out.shape == batch.shape
    changed = np.mean([not np.allclose(o, x, atol=1) for o, x in zip(out, batch)])
    assert changed > 0.8
    assert abs(out.mean() - batch.mean()) < 0.25 * batch.mean()  # content, not noise


def test_brightness_shifts_within_range(batch):
    out = _augment(batch, brightness=0.3)
    for o, x in zip(out, batch):
        inside = (x > 80) & (x < 150)            # away from clipping
        delta = (o - x)[inside]
        assert np.ptp(delta) < 1e-3 and abs(delta.mean()) <= 0.3 * 255 + 1e-3
    assert np.std([(o - x).mean() for o, x in zip(out, batch)]) > 1


def test_contrast_scales_spread_within_range(batch):
    out = _augment(batch, contrast=[0.7, 1.3])
    ratios = [o.std() / x.std() for o, x in zip(out, batch)]
    assert 0.65 <= min(ratios) and max(ratios) <= 1.35 and np.std(ratios) > 0.02


def test_blur_smooths(batch):
    out = _augment(batch, blur_probability=1.0)
    sharp = lambda a: np.abs(np.diff(a, axis=1)).mean()
    assert sharp(out) < 0.95 * sharp(batch)


def test_salt_and_pepper_fraction(batch):
    out = _augment(batch, salt_pepper=[0.03, 0.08])
    for o, x in zip(out, batch):
        hit = (o != x)
        assert set(np.unique(o[hit])) <= {0.0, 255.0}
        assert 0.02 <= hit.mean() <= 0.095  # 3-8% plus sampling noise of 4096 pixels
    layer = SaltAndPepper.from_config(SaltAndPepper((0.1, 0.2)).get_config())
    assert layer.fraction == (0.1, 0.2)


def test_random_crop_cuts_image_size(batch):
    big = tf.image.resize(batch, (73, 73)).numpy()
    fn = build_augmenter(AugmentConfig(**{**OFF, "random_crop": True}), SIZE, seed=0)
    assert tuple(fn(tf.convert_to_tensor(big)).shape) == (16, SIZE, SIZE, 1)


@pytest.mark.parametrize("loader", ["tfdata", "pydataset"])
def test_validation_untouched_training_augmented(bulk_dir, loader):
    cfg = load_config("configs/default.yaml", [f"data.image_size={SIZE}", "train.batch_size=8",
                                               f"data.loader={loader}"])
    from boneage_keras.data import load_dataset

    table = load_dataset(bulk_dir, check_images=False)[0].head(8)
    expected = np.stack([load_image(p, SIZE) for p in table["path"]]).astype(np.float32)
    if loader == "tfdata":
        val = next(iter(make_tf_dataset(table, cfg, training=False)))
        aug = build_augmenter(cfg.augment, SIZE, seed=0)
        train = next(iter(make_tf_dataset(table, cfg, training=True, augment=aug)))
        x_val, y_val = val[0].numpy(), val[1].numpy()
        x_train = train[0].numpy()
    else:
        x_val, y_val = BoneAgeDataset(table, cfg, training=False)[0]
        aug = build_augmenter(cfg.augment, SIZE, seed=0)
        x_train = BoneAgeDataset(table, cfg, training=True, augment=aug)[0][0]
    np.testing.assert_array_equal(x_val, expected)
    np.testing.assert_allclose(y_val, table["boneage"].to_numpy(np.float32))
    assert x_train.shape == expected.shape and x_train.dtype == np.float32
    # training images are augmented: no training image equals any original
    assert not any(np.allclose(t, e, atol=1) for t in x_train for e in expected)
