"""Augmentation on the three engines (keras-cv on TensorFlow ops, Keras core layers on
the active backend, fused NumPy), measured on real radiographs: each stage does what its
config key says, the engines draw from the same ranges, and the stages' draws are
independent."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from boneage_keras.augment import STAGES, build_augmenter
from boneage_keras.config import AugmentConfig
from boneage_keras.images import load_image

SIZE = 64
ENGINES = ("keras-cv", "keras", "numpy")
OFF = {"horizontal_flip": False, "rotation_degrees": 0, "translation": 0, "scale": None,
       "shear": 0, "brightness": 0, "contrast": None, "blur_probability": 0,
       "salt_pepper": None, "random_crop": False}


@pytest.fixture(scope="module")
def batch(bulk_dir):
    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str}).head(64)
    images = [load_image(bulk_dir / "images" / f"{i}.png", SIZE) for i in labels["id"]]
    return np.stack(images).astype(np.float32)


def _augment(batch, engine, seed=1, **stage):
    augmenter = build_augmenter(AugmentConfig(**{**OFF, **stage}), SIZE, seed=seed,
                                engine=engine)
    assert augmenter is not None and augmenter.engine == engine
    return augmenter.augment_batch(batch, epoch=0, batch=0)


def test_all_off_means_no_augmenter():
    assert build_augmenter(AugmentConfig(**OFF), SIZE, engine="keras") is None


def test_table_covers_every_augmentation_key():
    # C-Mixup blends pairs of images in the loaders (mixing.py), not one image per stage
    batch_level = {"engine", "mixup_alpha", "mixup_sigma"}
    keys = {f.name for f in AugmentConfig.__dataclass_fields__.values()} - batch_level
    assert {stage.key for stage in STAGES} == keys


@pytest.mark.parametrize("engine", ENGINES)
def test_flip_mirrors_some_images(batch, engine):
    out = _augment(batch, engine, horizontal_flip=True)
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, batch)]
    same = [np.array_equal(o, x) for o, x in zip(out, batch)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stage", [{"rotation_degrees": 15}, {"translation": 0.1},
                                   {"scale": [0.9, 1.1]}, {"shear": 0.2}])
def test_geometric_stages_move_pixels(batch, engine, stage):
    out = _augment(batch, engine, **stage)
    assert out.shape == batch.shape and out.dtype == np.float32
    changed = np.mean([not np.allclose(o, x, atol=1) for o, x in zip(out, batch)])
    assert changed > 0.8
    assert abs(out.mean() - batch.mean()) < 0.25 * batch.mean()  # content, not noise


@pytest.mark.parametrize("engine", ENGINES)
def test_blur_smooths(batch, engine):
    augmenter = build_augmenter(AugmentConfig(**{**OFF, "blur_probability": 1.0}), SIZE,
                                seed=1, engine=engine)
    sharp = lambda a: np.abs(np.diff(a, axis=1)).mean(axis=(1, 2, 3))   # per image
    # sigma is drawn from 0.1-1.5 (per image on keras-cv, per batch on Keras): over
    # four batches, never sharper on average, and some images clearly blurred (measured:
    # the sharpest drop is to 0.55-0.66 of the original on both engines)
    before = sharp(batch[:16])
    after = np.stack([sharp(augmenter.augment_batch(batch[:16], 0, k)) for k in range(4)])
    assert (after.mean(axis=1) <= 1.001 * before.mean()).all(), after.mean(axis=1)
    assert (after / before).min() < 0.75, (after / before).round(3)


@pytest.mark.parametrize("engine", ENGINES)
def test_salt_and_pepper_fraction(batch, engine):
    out = _augment(batch, engine, salt_pepper=[0.03, 0.08])
    fractions = []
    for o, x in zip(out, batch):
        hit = (o != x)
        assert set(np.unique(o[hit])) <= {0.0, 255.0}
        fractions.append(hit.mean())
    # 3-8% of 4096 pixels minus those already black/white, plus sampling noise
    assert 0.015 <= min(fractions) and max(fractions) <= 0.095
    assert np.std(fractions) > 0.005        # drawn per image


@pytest.mark.parametrize("engine", ENGINES)
def test_random_crop_cuts_image_size(batch, engine):
    big = np.stack([np.asarray(ndimage.zoom(x[..., 0], 73 / SIZE, order=1))[..., None]
                    for x in batch[:8]]).astype(np.float32)
    out = _augment(big, engine, random_crop=True)
    assert out.shape == (8, SIZE, SIZE, 1)


# --- the engines draw from the same ranges (measured on real images) -----------


def _best_angle(original, out, flips=(False,)):
    """(flipped, angle) whose rotation of ``original`` is closest to ``out``."""
    best = (np.inf, False, 0.0)
    for flip in flips:
        src = original[:, ::-1] if flip else original
        for angle in np.arange(-20, 20.25, 0.5):
            err = np.mean((ndimage.rotate(src, angle, reshape=False, order=1, cval=0.0)
                           - out) ** 2)
            if err < best[0]:
                best = (err, flip, float(angle))
    return best[1], best[2]


def _best_shift(original, out, reach=9):
    best = (np.inf, 0, 0)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            err = np.mean((ndimage.shift(original, (dy, dx), order=0, cval=0.0)
                           - out) ** 2)
            if err < best[0]:
                best = (err, dy, dx)
    return best[1], best[2]


@pytest.fixture(scope="module")
def ranges(batch, tmp_path_factory):
    """Per engine: rotation angles, translation shifts, brightness deltas, contrast
    ratios, estimated from 64 real images each (written to ranges.json)."""
    found = {}
    x = batch[..., 0]
    for engine in ENGINES:
        rot = _augment(batch, engine, seed=3, rotation_degrees=15)[..., 0]
        shift = _augment(batch, engine, seed=4, translation=0.1)[..., 0]
        bright = _augment(batch, engine, seed=5, brightness=0.3)[..., 0]
        contrast = _augment(batch, engine, seed=6, contrast=[0.7, 1.3])[..., 0]
        inside = (x > 5) & (x < 180)        # away from clipping at 0 and 255
        found[engine] = {
            "rotation_degrees": [_best_angle(a, b)[1] for a, b in zip(x[:32], rot[:32])],
            "translation_px": [max(map(abs, _best_shift(a, b)))
                               for a, b in zip(x[:24], shift[:24])],
            "brightness_delta": [float((b - a)[m].mean())
                                 for a, b, m in zip(x, bright, inside)],
            "contrast_ratio": [float(b.std() / a.std()) for a, b in zip(x, contrast)],
        }
    path = tmp_path_factory.mktemp("ranges") / "ranges.json"
    path.write_text(json.dumps(found))
    print("augmentation ranges measured:", {e: {k: [round(min(v), 2), round(max(v), 2)]
                                                for k, v in f.items()}
                                            for e, f in found.items()})
    return found


@pytest.mark.parametrize("engine", ENGINES)
def test_rotation_angles_span_the_configured_range(ranges, engine):
    angles = np.array(ranges[engine]["rotation_degrees"])
    assert np.abs(angles).max() <= 15.5          # never beyond rotation_degrees
    assert np.abs(angles).max() >= 11            # and reaching near it
    assert (angles > 2).any() and (angles < -2).any()
    assert 5.5 <= angles.std() <= 11.5           # uniform on [-15, 15]: std 8.7


@pytest.mark.parametrize("engine", ENGINES)
def test_translation_stays_within_its_fraction(ranges, engine):
    shifts = np.array(ranges[engine]["translation_px"])
    assert shifts.max() <= 7                     # 0.1 of 64 px = 6.4 px
    assert shifts.max() >= 4


@pytest.mark.parametrize("engine", ENGINES)
def test_brightness_is_additive_within_range(ranges, engine):
    deltas = np.array(ranges[engine]["brightness_delta"])
    assert np.abs(deltas).max() <= 0.3 * 255 + 1
    assert np.abs(deltas).max() >= 45 and (deltas > 5).any() and (deltas < -5).any()


@pytest.mark.parametrize("engine", ENGINES)
def test_contrast_scales_spread_within_range(ranges, engine):
    ratios = np.array(ranges[engine]["contrast_ratio"])
    assert 0.68 <= ratios.min() and ratios.max() <= 1.32 and ratios.std() > 0.08


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_engines_draw_from_the_same_ranges(ranges, engine):
    a, b = ranges["keras-cv"], ranges[engine]
    for key, tolerance in (("rotation_degrees", 3.0), ("brightness_delta", 15.0),
                           ("contrast_ratio", 0.08)):
        spread_a, spread_b = np.std(a[key]), np.std(b[key])
        assert abs(spread_a - spread_b) <= tolerance, (key, spread_a, spread_b)


@pytest.mark.parametrize("engine", ENGINES)
def test_flip_and_rotation_draws_are_independent(sample_dir, engine):
    """One seed shared by both layers would tie them (a flipped image always rotating
    the same way): every combination of flipped/not and left/right must occur."""
    image = load_image(sample_dir / "images" / "1437.png", SIZE).astype(np.float32)
    batch = np.repeat(image[None], 48, axis=0)
    out = _augment(batch, engine, seed=11, horizontal_flip=True, rotation_degrees=15)
    combos = [_best_angle(image[..., 0], o[..., 0], flips=(False, True)) for o in out]
    counts = {(flip, right): sum(1 for f, angle in combos if f == flip and
                                 (angle > 0) == right)
              for flip in (False, True) for right in (False, True)}
    assert all(n >= 4 for n in counts.values()), counts


@pytest.mark.parametrize("engine", ("keras", "numpy", "keras-cv"))
def test_engine_draws_per_epoch_and_batch(batch, engine):
    augmenter = build_augmenter(AugmentConfig(**{**OFF, "rotation_degrees": 15}), SIZE,
                                seed=2, engine=engine)
    first = augmenter.augment_batch(batch[:8], epoch=0, batch=3)
    np.testing.assert_array_equal(first, augmenter.augment_batch(batch[:8], 0, 3))
    assert not np.allclose(first, augmenter.augment_batch(batch[:8], 1, 3))
    assert not np.allclose(first, augmenter.augment_batch(batch[:8], 0, 4))


def test_reused_layers_draw_what_fresh_layers_draw(batch):
    """The keras engine builds its layers once per thread and re-seeds them per batch:
    every stage's output equals that of layers built fresh for (epoch, batch)."""
    import keras

    cfg = AugmentConfig(**{**OFF, "horizontal_flip": True, "rotation_degrees": 15,
                           "translation": 0.1, "scale": [0.9, 1.1], "shear": 0.2,
                           "brightness": 0.3, "contrast": [0.7, 1.3],
                           "blur_probability": 0.5, "salt_pepper": [0.03, 0.08],
                           "random_crop": True})
    augmenter = build_augmenter(cfg, SIZE, seed=5, engine="keras")
    outputs = {}
    for epoch, index in ((0, 0), (0, 1), (3, 7), (0, 0)):   # reused from the 2nd call
        outputs.setdefault((epoch, index), []).append(
            augmenter.augment_batch(batch[:8], epoch, index))
        with keras.device("cpu"):
            x = keras.ops.convert_to_tensor(batch[:8])
            for layer in augmenter.keras_layers(epoch, index):
                x = layer(x, training=True)
            fresh = np.clip(keras.ops.convert_to_numpy(x), 0, 255)
        np.testing.assert_allclose(outputs[(epoch, index)][-1], fresh, atol=1e-4)
    np.testing.assert_array_equal(*outputs[(0, 0)])
    assert not np.allclose(outputs[(0, 0)][0], outputs[(0, 1)][0])


# --- the numpy engine's one warp per image -------------------------------------------


def _map(angle_degrees=0.0, shift=(0.0, 0.0), flip=False):
    """A centred output-to-input map: mirror, then rotate, then shift (x, y) pixels."""
    a = np.deg2rad(angle_degrees)
    m = np.array([[np.cos(a), -np.sin(a), shift[0]], [np.sin(a), np.cos(a), shift[1]],
                  [0, 0, 1.0]])
    return np.diag([-1.0 if flip else 1.0, 1, 1]) @ m


def test_warp_identity_shift_and_mirror_are_exact(batch):
    from boneage_keras.augment_numpy import warp

    x = batch[:4, ..., 0]
    np.testing.assert_array_equal(warp(x, np.stack([_map()] * 4), SIZE), x)
    np.testing.assert_array_equal(warp(x, np.stack([_map(flip=True)] * 4), SIZE),
                                  x[:, :, ::-1])
    # reading input pixel (x + 3, y - 2) at output (x, y): content moves left 3, down 2
    shifted = warp(x, np.stack([_map(shift=(3, -2))] * 4), SIZE)
    expected = np.stack([ndimage.shift(i, (2, -3), order=0, cval=0.0) for i in x])
    np.testing.assert_array_equal(shifted, expected)


def test_warp_composes_as_the_layers_apply_one_after_another(batch):
    """Warping by A and then by B is one warp by A @ B (the numpy engine's fusion), and
    not by B @ A: rotation and shift do not commute."""
    from boneage_keras.augment_numpy import warp

    x = batch[:8, ..., 0]
    a = np.stack([_map(angle_degrees=12)] * 8)
    b = np.stack([_map(shift=(6, -4))] * 8)
    twice = warp(warp(x, a, SIZE), b, SIZE)
    inner = (slice(None), slice(12, -12), slice(12, -12))   # away from the black fill
    fused = warp(x, a @ b, SIZE)[inner]
    assert np.abs(fused - twice[inner]).mean() < 2.0      # bilinear twice vs once
    assert np.abs(warp(x, b @ a, SIZE)[inner] - twice[inner]).mean() > 4.0
