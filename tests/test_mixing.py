"""C-Mixup on real images: every training image the loaders give is a blend of two
originals of the same sex, its age blended by the same amount, its partner one of a
similar age; padding and images that failed to decode stay out of it."""

import numpy as np
import pytest

from boneage_keras.config import ConfigError, load_config
from boneage_keras.data import load_dataset
from boneage_keras.images import load_image
from boneage_keras.loaders import BoneAgeDataset, make_tf_dataset
from boneage_keras.mixing import mix_numpy, mix_tf

SIZE = 48
N = 24
NO_AUGMENT = ["augment.horizontal_flip=false", "augment.rotation_degrees=0",
              "augment.translation=0", "augment.scale=null", "augment.brightness=0",
              "augment.contrast=null"]


@pytest.fixture(scope="module")
def batch(bulk_dir):
    table = load_dataset(bulk_dir, check_images=False)[0].head(N).reset_index(drop=True)
    images = np.stack([load_image(p, SIZE) for p in table["path"]]).astype(np.float32)
    return table, images


def explain(image, label, sex, images, labels, males):
    """The (i, j, lam) with image == lam * images[i] + (1 - lam) * images[j] among
    originals of this sex that fits best, or None if none fits."""
    best = None
    for i in np.flatnonzero(males == sex):
        if np.allclose(image, images[i], atol=1e-3):
            return i, i, 1.0
        for j in np.flatnonzero(males == sex):
            if i == j:
                continue
            d = (images[i] - images[j]).ravel()
            lam = float(np.dot(image.ravel() - images[j].ravel(), d) / np.dot(d, d))
            residual = np.abs(image - (lam * images[i] + (1 - lam) * images[j])).max()
            if 0 <= lam <= 1 and (best is None or residual < best[0]):
                best = (residual, i, j, lam)
    if best is None or best[0] > 0.01:
        return None
    _, i, j, lam = best
    assert label == pytest.approx(lam * labels[i] + (1 - lam) * labels[j], abs=0.01)
    return i, j, lam


def check_blends(x, y, male, images, labels, males, sigma_months):
    """Every row a same-sex blend with its label blended alike; most rows mixed, each
    with one of the few closest same-sex ages."""
    mixed = 0
    for k in range(len(x)):
        found = explain(x[k], y[k], male[k], images, labels, males)
        assert found is not None, f"row {k} is not a blend of two same-sex originals"
        i, j, lam = found
        if i != j and 0.02 < lam < 0.98:
            mixed += 1
            same = np.flatnonzero(males == male[k])

            def third_gap(a, same=same):
                gaps = sorted(abs(labels[a] - labels[m]) for m in same if m != a)
                return gaps[min(2, len(gaps) - 1)]
            gap = abs(labels[i] - labels[j])
            assert gap <= sigma_months or gap <= max(third_gap(i), third_gap(j)) + 1e-3
    assert mixed >= len(x) // 2


@pytest.mark.parametrize("loader", ["pydataset", "tfdata"])
def test_loaders_blend_same_sex_images_of_similar_age(batch, loader):
    table, images = batch
    cfg = load_config("configs/default.yaml", [
        f"data.image_size={SIZE}", f"train.batch_size={N}", f"data.loader={loader}",
        "model.use_sex=true", "augment.mixup_alpha=1.0", "augment.mixup_sigma=3",
        *NO_AUGMENT])
    labels = table["boneage"].to_numpy(np.float32)
    males = table["male"].to_numpy(np.float32)
    if loader == "tfdata":
        inputs, y, w = (t.numpy() if not isinstance(t, dict) else
                        {k: v.numpy() for k, v in t.items()}
                        for t in next(iter(make_tf_dataset(table, cfg, training=True))))
        val = next(iter(make_tf_dataset(table, cfg, training=False)))
        np.testing.assert_allclose(val[1].numpy(), labels)       # validation: untouched
    else:
        inputs, y = BoneAgeDataset(table, cfg, training=True)[0]
        w = np.ones(N)
        _, y_val = BoneAgeDataset(table, cfg, training=False)[0]
        np.testing.assert_allclose(y_val, labels)
    assert inputs["image"].dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_allclose(w, 1.0)          # unweighted images stay weight 1
    check_blends(inputs["image"], y, inputs["male"].ravel(), images, labels, males, 3)


def test_tensorflow_and_numpy_draw_alike(batch):
    """The same rules in both: same sex, weight-0 rows untouched and never partners,
    labels and weights blended with the images."""
    table, images = batch
    labels = table["boneage"].to_numpy(np.float32)
    males = table["male"].to_numpy(np.float32)
    weights = np.ones(N, np.float32)
    weights[3] = 0.0
    labels_marked = labels.copy()
    labels_marked[3] = 1000.0            # would show in any row it was mixed into
    results = [mix_numpy(images, males.reshape(-1, 1), labels_marked, weights, 0.5, None,
                         np.random.default_rng(1))]
    tf_out = mix_tf(images, males.reshape(-1, 1), labels_marked, weights, 0.5, None,
                    np.array([1, 2], np.int64))
    results.append(tuple(t.numpy() for t in tf_out))
    for x, y, w in results:
        np.testing.assert_array_equal(x[3], images[3])
        assert y[3] == 1000.0 and w[3] == 0.0
        others = np.delete(np.arange(N), 3)
        assert y[others].max() <= labels[others].max() + 1e-3
        np.testing.assert_allclose(w[others], 1.0)
        check_blends(x[others], y[others], males[others], images, labels_marked, males,
                     sigma_months=np.inf)


def test_a_lone_girl_is_left_as_she_is(batch):
    table, images = batch
    males = np.ones(N, np.float32)
    males[5] = 0.0
    labels = table["boneage"].to_numpy(np.float32)
    x, y, _ = mix_numpy(images, males, labels, np.ones(N, np.float32), 2.0, 12.0,
                        np.random.default_rng(0))
    np.testing.assert_array_equal(x[5], images[5])
    assert y[5] == labels[5]
    assert (y[males == 1] != labels[males == 1]).sum() >= N // 2


@pytest.mark.parametrize("key, value", [("augment.mixup_alpha", "-1"),
                                        ("augment.mixup_sigma", "0")])
def test_bad_mixup_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/default.yaml", [f"{key}={value}"])
