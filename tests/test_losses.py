"""Label-distribution learning: the targets, the loss, and a model trained with it on
real images that saves, loads and exports as one output in months."""

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


def test_ldl_learns_real_images_and_saves_a_months_model(bulk_dir, tmp_path):
    """Training steps on real radiographs lower the loss; the weights copied into the
    one-output age model (what best.keras is) predict exactly the trainer's months, and
    that model saves, loads and exports to ONNX with the same months; a zero sample
    weight takes an image out of the loss."""
    import keras
    import onnxruntime

    from boneage_keras.export import keras_onnx
    from boneage_keras.images import load_image
    from boneage_keras.losses import LabelDistributionTrainer
    from boneage_keras.model import build_model, load_model
    from boneage_keras.train import compile_model

    table = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})[:32]
    images = np.stack([load_image(bulk_dir / "images" / f"{i}.png", 64, "stretch")
                       for i in table["id"]]).astype(np.float32)
    ages = table["boneage"].to_numpy(np.float32)
    male = table["male"].to_numpy(np.float32)[:, None]
    cfg = load_config("cpu-bench", ["data.image_size=64", "model.age_distribution=true",
                                    "train.loss=ldl", "train.learning_rate=0.003"])
    keras.utils.set_random_seed(0)
    age_model = build_model(cfg, float(ages.mean()), float(ages.std()))
    trainer = compile_model(age_model, cfg)
    assert isinstance(trainer, LabelDistributionTrainer)
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


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_ldl_trains_through_the_cli_on_every_backend(backend, bulk_dir, tmp_path):
    """`train` with the distribution head and the ldl loss on real images (rare ages
    weighted up, so the loss takes sample weights): its history's loss is not the MAE,
    and best.keras is an age model that predicts months on another backend's load."""
    from conftest import SMALL_TRAIN, run_cli

    from boneage_keras.model import load_model

    run_cli(["train", "--data-dir", str(bulk_dir), *SMALL_TRAIN,
             "--set", "model.age_distribution=true", "--set", "train.loss=ldl",
             "--set", "train.age_balance=0.5", "--set", "model.use_sex=true",
             "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=ldl"],
            backend=backend, tensorflow=backend == "tensorflow")
    run = tmp_path / "ldl"
    history = pd.read_csv(run / "history.csv")
    assert np.isfinite(history["loss"]).all()
    assert not np.allclose(history["loss"], history["mae"])
    model = load_model(str(run / "best.keras"))
    assert model.get_layer("age_distribution").output.shape[-1] == 241
    assert len(model.outputs) == 1
    out = model.predict({"image": np.zeros((2, 64, 64, 1), "float32"),
                         "male": np.ones((2, 1), "float32")}, verbose=0)
    assert out.shape == (2, 1)
