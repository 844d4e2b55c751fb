"""Label-distribution learning and ordinal regression (CORAL): the targets, the losses,
and models trained with them on real images that save, load and export as one output
in months."""

import numpy as np
import pandas as pd
import pytest

from boneage_keras.config import ConfigError, load_config


def test_gaussian_targets_peak_at_the_age_with_the_configured_width():
    from keras import ops

    from boneage_keras.losses import gaussian_targets

    p = ops.convert_to_numpy(ops.exp(gaussian_targets(np.array([100.0, 0.0, 37.5]),
                                                      0, 240, 8.0)))
    centers = np.arange(241)
    assert p.shape == (3, 241) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p[0].argmax() == 100 and p[1].argmax() == 0
    assert p[2, 37] == pytest.approx(p[2, 38], rel=1e-4)   # halfway between two bins
    mean = (p[0] * centers).sum()
    assert mean == pytest.approx(100.0, abs=1e-3)
    assert np.sqrt((p[0] * (centers - mean) ** 2).sum()) == pytest.approx(8.0, rel=1e-3)
    # at the range's edge the Gaussian is cut off: what is left lies above the age
    assert (p[1] * centers).sum() > 5.0


def test_the_loss_is_least_for_the_target_and_grows_with_the_distance():
    from keras import ops

    from boneage_keras.losses import gaussian_targets, label_distribution_loss

    ages = np.array([60.0, 60.0, 60.0])
    # logits of distributions centred on 60, 72 and 120 months
    logits = gaussian_targets(np.array([60.0, 72.0, 120.0]), 0, 240, 8.0)
    months = np.array([[60.0], [72.0], [120.0]], "float32")
    kl = ops.convert_to_numpy(label_distribution_loss(ages, logits, months, 0, 240, 8.0,
                                                      0.0))
    both = ops.convert_to_numpy(label_distribution_loss(ages, logits, months, 0, 240, 8.0,
                                                        1.0))
    assert kl[0] == pytest.approx(0.0, abs=1e-4)
    assert 0 < kl[1] < kl[2]
    # two equal-width Gaussians 12 months apart: KL = 12^2 / (2 sigma^2)
    assert kl[1] == pytest.approx(144 / 128, rel=1e-3)
    assert both - kl == pytest.approx([0.0, 1.0, 5.0], abs=1e-4)   # |error| in years


def test_ldl_needs_the_distribution_head():
    with pytest.raises(ConfigError, match="model.age_distribution"):
        load_config("cpu-bench", ["train.loss=ldl"])
    with pytest.raises(ConfigError, match="train.ldl_sigma"):
        load_config("cpu-bench", ["model.age_distribution=true", "train.loss=ldl",
                                  "train.ldl_sigma=0"])


def _confident(centres, low=0, high=240, margin=20.0):
    """CORAL logits sure that each age is above every threshold below its centre and
    below every other one."""
    thresholds = np.arange(low, high) + 0.5
    return np.where(thresholds[None, :] < np.asarray(centres)[:, None], margin,
                    -margin).astype("float32")


def test_coral_loss_counts_the_thresholds_on_the_wrong_side():
    from keras import ops

    from boneage_keras.losses import coral_loss
    from boneage_keras.model import OrdinalAge

    logits = _confident([60, 72, 120])
    loss = ops.convert_to_numpy(coral_loss(np.array([60.0, 60.0, 60.0]), logits, 0))
    assert loss[0] == pytest.approx(0.0, abs=1e-3)
    # 12 and 60 thresholds sure of the wrong side, each costing about the margin
    assert loss[1:] == pytest.approx([12 * 20.0, 60 * 20.0], rel=1e-3)
    months = ops.convert_to_numpy(OrdinalAge(0, 240)(logits)).ravel()
    assert months == pytest.approx([60.0, 72.0, 120.0], abs=1e-3)
    # an age between two thresholds' months: the threshold below counts as passed
    assert float(coral_loss(np.array([60.4]), _confident([60]), 0)[0]) < 1e-3
    assert float(coral_loss(np.array([60.6]), _confident([60]), 0)[0]) > 19.0


def test_ordinal_head_needs_coral_to_train_it_and_starts_at_the_mean():
    with pytest.raises(ConfigError, match="model.ordinal"):
        load_config("cpu-bench", ["train.loss=coral"])
    with pytest.raises(ConfigError, match="one age head"):
        load_config("cpu-bench", ["model.ordinal=true", "model.age_distribution=true"])
    from boneage_keras.model import build_model

    cfg = load_config("cpu-bench", ["data.image_size=32", "model.ordinal=true",
                                    "train.loss=coral"])
    model = build_model(cfg, 100.0, 40.0)
    x = {"image": np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)),
         "male": np.ones((4, 1), "float32")}
    assert model.get_layer("head_out").output.shape[-1] == 240
    assert model.predict(x, verbose=0).ravel() == pytest.approx([100.0] * 4, abs=1.0)


@pytest.mark.parametrize("head", ["ldl", "coral"])
def test_head_losses_learn_real_images_and_save_a_months_model(head, bulk_dir, tmp_path):
    """Training steps on real radiographs lower the loss; the weights copied into the
    one-output age model (what best.keras is) predict exactly the trainer's months, and
    that model saves, loads and exports to ONNX with the same months; a zero sample
    weight takes an image out of the loss."""
    import keras
    import onnxruntime

    from boneage_keras.export import keras_onnx
    from boneage_keras.images import load_image
    from boneage_keras.losses import LabelDistributionTrainer, OrdinalTrainer
    from boneage_keras.model import build_model, load_model
    from boneage_keras.train import compile_model

    table = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})[:32]
    images = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 64, "stretch")
                       for i in table["id"]]).astype(np.float32)
    ages = table["boneage"].to_numpy(np.float32)
    male = table["male"].to_numpy(np.float32)[:, None]
    model_key, trainer_class = {"ldl": ("model.age_distribution", LabelDistributionTrainer),
                                "coral": ("model.ordinal", OrdinalTrainer)}[head]
    cfg = load_config("cpu-bench", ["data.image_size=64", f"{model_key}=true",
                                    f"train.loss={head}", "train.learning_rate=0.003"])
    keras.utils.set_random_seed(0)
    age_model = build_model(cfg, float(ages.mean()), float(ages.std()))
    trainer = compile_model(age_model, cfg)
    assert isinstance(trainer, trainer_class)
    x = {"image": images, "male": male}
    steps = [trainer.train_on_batch(x, ages, return_dict=True) for _ in range(12)]
    first, after = steps[0], steps[-1]
    assert after["loss"] < first["loss"] and after["mae"] < first["mae"]
    assert after["loss"] != pytest.approx(after["mae"])   # the loss is not the MAE

    twin = build_model(cfg, float(ages.mean()), float(ages.std()))
    twin.set_weights(trainer.get_weights())
    months = trainer.predict(x, verbose=0)[0]
    assert np.allclose(twin.predict(x, verbose=0), months, atol=1e-4)
    assert months.shape == (32, 1)

    twin.save(tmp_path / "best.keras")
    loaded = load_model(str(tmp_path / "best.keras"))
    assert len(loaded.outputs) == 1
    assert np.allclose(loaded.predict(x, verbose=0), months, atol=1e-4)
    keras_onnx(tmp_path / "best.keras", tmp_path / "model.onnx")
    runtime = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    names = [i.name for i in runtime.get_inputs()]
    onnx_months = runtime.run(None, dict(zip(names, (images, male))))[0]
    assert np.allclose(onnx_months.ravel(), months.ravel(), atol=1e-2)

    # a zero weight removes an image: the loss equals the loss without it, rescaled
    weights = np.ones(32, "float32")
    weights[:8] = 0
    weighted = trainer.compute_loss(x, ages, trainer(x), weights)
    rest = trainer.compute_loss({"image": images[8:], "male": male[8:]}, ages[8:],
                                trainer({"image": images[8:], "male": male[8:]}))
    assert float(weighted) == pytest.approx(float(rest) * 24 / 32, rel=1e-4)


@pytest.mark.parametrize("backend,head", [("torch", "ldl"), ("jax", "ldl"),
                                          ("tensorflow", "ldl"), ("jax", "coral")])
def test_head_losses_train_through_the_cli(backend, head, bulk_dir, tmp_path):
    """`train` with the distribution head and the ldl loss on every backend, and with
    the ordinal head and coral on JAX (torch: the test above), on real images (rare
    ages weighted up, so the loss takes sample weights): its history's loss is not the
    MAE, and best.keras is an age model that predicts months on another backend's
    load."""
    from conftest import SMALL_TRAIN, run_cli

    from boneage_keras.model import load_model

    model_key, layer, width = {"ldl": ("model.age_distribution", "age_distribution", 241),
                               "coral": ("model.ordinal", "head_out", 240)}[head]
    run_cli(["train", "--data-dir", str(bulk_dir), *SMALL_TRAIN,
             "--set", f"{model_key}=true", "--set", f"train.loss={head}",
             "--set", "train.age_balance=0.5", "--set", "model.use_sex=true",
             "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=head"],
            backend=backend, tensorflow=backend == "tensorflow")
    run = tmp_path / "head"
    history = pd.read_csv(run / "history.csv")
    assert np.isfinite(history["loss"]).all()
    assert not np.allclose(history["loss"], history["mae"])
    model = load_model(str(run / "best.keras"))
    assert model.get_layer(layer).output.shape[-1] == width
    assert len(model.outputs) == 1
    out = model.predict({"image": np.zeros((2, 64, 64, 1), "float32"),
                         "male": np.ones((2, 1), "float32")}, verbose=0)
    assert out.shape == (2, 1)
