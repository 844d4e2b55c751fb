"""Input pipelines on real images: tf.data and the PyDataset augment training batches
only, reshuffle per epoch (a resumed run continues the sequence), and skip an image
that fails to decode mid-run, up to a limit."""

import logging

import numpy as np
import pandas as pd
import pytest

from boneage_keras.augment import build_augmenter
from boneage_keras.config import ConfigError, load_config
from boneage_keras.data import load_dataset
from boneage_keras.images import ImageError, load_image
from boneage_keras.loaders import BoneAgeDataset, make_tf_dataset, resolve_loader

SIZE = 64


@pytest.mark.parametrize("loader, engine", [("tfdata", "keras-cv"), ("pydataset", "keras"),
                                            ("pydataset", "keras-cv"), ("pydataset", "numpy")])
def test_validation_untouched_training_augmented(bulk_dir, loader, engine):
    cfg = load_config("configs/default.yaml", [f"data.image_size={SIZE}", "train.batch_size=8",
                                               f"data.loader={loader}",
                                               f"augment.engine={engine}"])
    table = load_dataset(bulk_dir, check_images=False)[0].head(8)
    expected = np.stack([load_image(p, SIZE) for p in table["path"]]).astype(np.float32)
    aug = build_augmenter(cfg.augment, SIZE, seed=0)
    if loader == "tfdata":
        val = next(iter(make_tf_dataset(table, cfg, training=False)))
        train = next(iter(make_tf_dataset(table, cfg, training=True, augmenter=aug)))
        x_val, y_val = val[0].numpy(), val[1].numpy()
        x_train, y_train = train[0].numpy(), train[1].numpy()
    else:
        x_val, y_val = BoneAgeDataset(table, cfg, training=False)[0]
        x_train, y_train = BoneAgeDataset(table, cfg, training=True, augmenter=aug)[0]
    np.testing.assert_array_equal(x_val, expected)
    np.testing.assert_allclose(y_val, table["boneage"].to_numpy(np.float32))
    assert x_train.shape == expected.shape and x_train.dtype == np.float32
    # training images are augmented: no training image equals any original
    assert not any(np.allclose(t, e, atol=1) for t in x_train for e in expected)
    assert sorted(y_train) == sorted(y_val)      # the same images, shuffled


def test_pydataset_epochs_reshuffle_and_resume_continues(bulk_dir):
    cfg = load_config("configs/default.yaml", [f"data.image_size={SIZE}",
                                               "train.batch_size=4"])
    table = load_dataset(bulk_dir, check_images=False)[0].head(40)
    data = BoneAgeDataset(table, cfg, training=True)
    orders = []
    for _ in range(3):
        data.on_epoch_begin()
        orders.append(data.order.copy())
        assert sorted(data.order) == list(range(40))    # each image once per epoch
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    resumed = BoneAgeDataset(table, cfg, training=True, start_epoch=2)
    resumed.on_epoch_begin()
    np.testing.assert_array_equal(resumed.order, orders[2])   # epoch 3 as it was


@pytest.mark.parametrize("loader", ["tfdata", "pydataset"])
def test_an_image_failing_mid_run_is_skipped_up_to_the_limit(bulk_dir, loader, caplog):
    cfg = load_config("default", [f"data.image_size={SIZE}", "train.batch_size=8",
                                  f"data.loader={loader}", "data.max_unreadable=1"])
    table = load_dataset(bulk_dir, check_images=False)[0].head(8).copy()
    bad = table["path"].iloc[3]

    def flaky(path, *args, **kwargs):          # a disk that fails on one file
        if path in broken:
            raise ImageError(f"cannot decode image {path}: read error")
        return load_image(path, *args, **kwargs)

    broken = {bad}
    with caplog.at_level(logging.WARNING, logger="boneage_keras"):
        if loader == "tfdata":
            _, y, weight = (t.numpy() for t in next(iter(
                make_tf_dataset(table, cfg, training=False, reader=flaky))))
            assert len(y) == 8 and weight.tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
        else:
            _, y = BoneAgeDataset(table, cfg, training=False, reader=flaky)[0]
            ages = table["boneage"].to_numpy(np.float32)
            np.testing.assert_allclose(y, np.delete(ages, 3))    # the image left out
    assert f"skipped an image that failed to decode: cannot decode image {bad}" in caplog.text
    broken = set(table["path"].iloc[2:4])       # two failures: over the limit of one
    with pytest.raises(Exception, match="2 images failed to decode.*max_unreadable=1"):
        if loader == "tfdata":
            next(iter(make_tf_dataset(table, cfg, training=False, reader=flaky)))
        else:
            BoneAgeDataset(table, cfg, training=False, reader=flaky)[0]


@pytest.mark.parametrize("engine", ["keras", "numpy"])
def test_tfdata_refuses_an_engine_that_augments_in_numpy_workers(engine):
    cfg = load_config("configs/default.yaml", ["data.loader=tfdata",
                                               f"augment.engine={engine}"])
    with pytest.raises(ConfigError, match=f"augment.engine.*'{engine}'.*pydataset"):
        resolve_loader(cfg)
    cfg.data.loader = "auto"
    assert resolve_loader(cfg) == "pydataset"


def test_tfdata_augmentation_does_not_depend_on_a_dropped_pass(bulk_dir):
    """Keras' fit opens an iterator to look at the first batch and drops it, while its
    prefetch has augmented a few batches more (how many depends on the threads): the
    next pass must get the same images whether the pass before it ran one batch or all
    of them (README command 1 gave val MAE 35.83 or 30.13 before this held:
    experiments/2026-11-27-augmentation-engines.md)."""
    cfg = load_config("configs/default.yaml", [f"data.image_size={SIZE}", "train.batch_size=8",
                                               "data.loader=tfdata", "augment.engine=keras-cv",
                                               "augment.horizontal_flip=true",
                                               "augment.rotation_degrees=15"])
    table = load_dataset(bulk_dir, check_images=False)[0].head(64)

    def passes(first_pass_batches):
        ds = make_tf_dataset(table, cfg, training=True,
                             augmenter=build_augmenter(cfg.augment, SIZE, seed=3))
        first = iter(ds)
        taken = [next(first)[0].numpy() for _ in range(first_pass_batches)]
        del first
        return taken, [batch[0].numpy() for batch in ds]

    whole, second = passes(8)
    dropped, second_again = passes(1)
    np.testing.assert_array_equal(dropped[0], whole[0])
    assert len(second) == len(second_again) == 8
    for a, b in zip(second, second_again):
        np.testing.assert_array_equal(a, b)
    # a new pass draws anew: the second pass is not the first again
    assert not any(np.array_equal(a, b) for a, b in zip(whole, second))


@pytest.mark.parametrize("loader", ["tfdata", "pydataset"])
def test_age_balance_weights_training_batches_by_their_age_bins_only(bulk_dir, loader):
    cfg = load_config("configs/default.yaml", [f"data.image_size={SIZE}", "train.batch_size=64",
                                               f"data.loader={loader}", "augment.engine=keras",
                                               "train.age_balance=1"])
    table = load_dataset(bulk_dir, check_images=False)[0]
    # 50 children of 13-14 years and 5 infants: the infants' bin is ten times rarer
    table = pd.concat([table[table["boneage"].between(156, 167)].head(50),
                       table[table["boneage"] < 12].head(5)]).reset_index(drop=True)
    if loader == "tfdata":
        batch = next(iter(make_tf_dataset(table, cfg, training=True)))
        ages, weights = batch[1].numpy(), batch[2].numpy()
        val_weights = next(iter(make_tf_dataset(table, cfg, training=False)))[2].numpy()
    else:
        ages, weights = BoneAgeDataset(table, cfg, training=True)[0][1:]
        assert len(BoneAgeDataset(table, cfg, training=False)[0]) == 2   # no weights
        val_weights = np.ones(1)
    infant = ages < 12
    assert infant.sum() == 5 and len(ages) == 55
    # each bin weighs the same in all: 5 infants x w = 50 others x v, mean weight 1
    np.testing.assert_allclose(weights[infant], 5.5, rtol=1e-5)
    np.testing.assert_allclose(weights[~infant], 0.55, rtol=1e-5)
    np.testing.assert_array_equal(val_weights, 1.0)
