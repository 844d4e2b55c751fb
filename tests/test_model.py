import keras
import numpy as np
import pytest

from boneage_keras.config import load_config
from boneage_keras.model import (
    WeightsError,
    build_backbone,
    build_model,
    load_model,
    preprocessing_of,
    refresh_batchnorm,
)


def _cfg(*extra):
    return load_config("configs/default.yaml",
                       ["data.image_size=64", "model.weights=none", *extra])


def _real_images(bulk_dir, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` real radiographs at 64 px, (n, 64, 64, 1) float32, and their
    ages in months."""
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})[:n]
    images = np.stack([np.asarray(Image.open(bulk_dir / "images" / f"{i}.png").resize(
        (64, 64)), np.float32) for i in table["id"]])[..., None]
    return images, table["boneage"].to_numpy(np.float32)


def _reloads_and_explains(model, images, path):
    """``model`` saved to ``path`` reloads predicting the same months on four images,
    and Grad-CAM explains the reloaded one (a map that varies, the same months);
    returns the reloaded model."""
    from boneage_keras.explain import grad_cam

    model.save(path)
    again = load_model(str(path))
    np.testing.assert_allclose(again.predict(images[:4], verbose=0),
                               model.predict(images[:4], verbose=0), atol=1e-4)
    heat, months = grad_cam(again, images[:4])
    assert heat.shape == (4, 64, 64) and (heat.std(axis=(1, 2)) > 1e-3).all()
    np.testing.assert_allclose(months, again.predict(images[:4], verbose=0).ravel(),
                               atol=0.05)
    return again


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18"])
def test_shapes_and_initial_prediction_is_training_mean(backbone):
    model = build_model(_cfg(f"model.backbone={backbone}"), label_mean=100.0, label_std=40.0)
    assert model.input_shape == (None, 64, 64, 1) and model.output_shape == (None, 1)
    out = keras.ops.convert_to_numpy(model(np.random.uniform(0, 255, (2, 64, 64, 1))))
    np.testing.assert_allclose(out, 100.0, atol=1e-4)    # zero-initialised output layer
    assert out.dtype == np.float32
    assert model.get_layer("head_dense").units == 256


def test_linear_head_and_sex_input():
    model = build_model(_cfg("model.head_units=0", "model.use_sex=true"))
    names = [layer.name for layer in model.layers]
    assert "head_dense" not in names and "sex_dense" in names
    x = {"image": np.zeros((3, 64, 64, 1), "float32"),
         "male": np.array([[1.0], [0.0], [1.0]], "float32")}
    assert model.predict(x, verbose=0).shape == (3, 1)
    assert preprocessing_of(model)["use_sex"] is True


def test_refresh_batchnorm_matches_inference_to_the_weights(bulk_dir):
    """After a refresh from one batch of real images, the backbone in inference mode
    gives what it gives in training mode on that batch (the moving statistics are the
    batch's); before it, a fresh model's moving statistics (0 and 1) are far off. Only
    the moving statistics change."""
    images, _ = _real_images(bulk_dir, 16)
    model = build_model(_cfg("model.backbone=resnet18"))
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    x = model.get_layer("preprocess")(images, training=False)

    def features(training):
        return keras.ops.convert_to_numpy(backbone(x, training=training))

    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    scale = np.abs(features(True)).mean()
    assert np.abs(features(False) - features(True)).mean() > 0.1 * scale
    assert refresh_batchnorm(model, [images]) == 1
    np.testing.assert_allclose(features(False), features(True), atol=1e-3 * scale)
    for w, old in zip(model.trainable_weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), old)
    norms = [layer for layer in backbone._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.momentum == 0.9 for layer in norms)


def test_weights_file_loads(tmp_path):
    source = build_backbone("resnet18", 64, None)
    path = tmp_path / "resnet18.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("resnet18", 64, str(path))
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    with pytest.raises(WeightsError, match="does not fit"):
        build_backbone("resnet50", 64, str(path))
    with pytest.raises(WeightsError, match="file not found"):
        build_backbone("resnet18", 64, str(tmp_path / "nope.h5"))


def test_imagenet_offline_error_suggests_alternatives(monkeypatch):
    from keras.src.applications import resnet

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")  # noqa: TRY002 (as Keras does)

    monkeypatch.setattr(resnet.file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet50", 64, "imagenet")
    assert "model.weights=none" in str(err.value) and "internet" in str(err.value)
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_backbone("resnet18", 64, "imagenet")


def test_saved_model_reloads_with_preprocessing(tmp_path):
    model = build_model(_cfg("model.backbone=resnet18", "data.resize=stretch"), 90.0, 30.0)
    model.save(tmp_path / "m.keras")
    again = load_model(str(tmp_path / "m.keras"))
    x = np.random.uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    assert preprocessing_of(again) == {"image_size": 64, "resize": "stretch", "crop_hand": False,
                                       "random_crop": False, "geometry": "stretch",
                                       "use_sex": False}
    with pytest.raises(ValueError, match="not a boneage-keras model"):
        preprocessing_of(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))


def test_files_written_under_the_earlier_preprocessing_names_load_the_same():
    """Before the config's names, the layer stored ``crop`` and a ``hand+`` resize, and
    model.json ``input_size`` and ``center_crop``: both still read."""
    from boneage_keras.inference import preprocessing_from_meta
    from boneage_keras.model import GrayPreprocess

    layer = GrayPreprocess.from_config({"mode": "torch", "image_size": 96,
                                        "resize": "hand+stretch", "crop": True})
    assert (layer.resize, layer.crop_hand, layer.random_crop) == ("stretch", True, True)
    assert "crop" not in layer.get_config()
    old = {"input_size": 96, "use_sex": True,
           "preprocessing": {"resize": "hand+pad", "center_crop": True}}
    new = {"image_size": 96, "use_sex": True,
           "preprocessing": {"resize": "pad", "crop_hand": True, "random_crop": True}}
    assert preprocessing_from_meta(old) == preprocessing_from_meta(new) == {
        "image_size": 96, "resize": "pad", "crop_hand": True, "random_crop": True,
        "geometry": "hand+pad", "use_sex": True}


def test_head_activation_from_config_survives_saving(tmp_path):
    """model.head_activation sets the hidden layer's activation (leaky_relu lets negative
    inputs through, scaled; relu zeroes them) and a reloaded model keeps it."""
    negative = -np.ones((1, 4), "float32")
    for name, passes in (("relu", False), ("leaky_relu", True)):
        model = build_model(_cfg("model.backbone=resnet18", f"model.head_activation={name}"))
        model.save(tmp_path / f"{name}.keras")
        head = load_model(str(tmp_path / f"{name}.keras")).get_layer("head_dense")
        out = keras.ops.convert_to_numpy(head.activation(negative))
        assert (out < 0).all() if passes else (out == 0).all(), (name, out)


def test_resnet18_width_scales_channels_and_survives_saving(tmp_path):
    """model.width 0.5: every ResNet18 layer at half its channels (about a quarter of
    the backbone's weights), and a reloaded model is the same network."""
    full = build_model(_cfg("model.backbone=resnet18"))
    half = build_model(_cfg("model.backbone=resnet18", "model.width=0.5"))
    backbone = half.get_layer("resnet18")
    assert backbone.output.shape[-1] == 256 and backbone.get_layer("stem_conv").filters == 32
    ratio = backbone.count_params() / full.get_layer("resnet18").count_params()
    assert 0.2 < ratio < 0.3, ratio
    half.save(tmp_path / "half.keras")
    again = load_model(str(tmp_path / "half.keras"))
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    assert again.get_layer("resnet18").count_params() == backbone.count_params()
    np.testing.assert_allclose(again.predict(x, verbose=0), half.predict(x, verbose=0),
                               atol=1e-5)


def test_resnet18_without_stem_pool_keeps_twice_the_resolution(tmp_path):
    """model.stem_pool false: the same weights, every stage at twice the resolution (the
    last feature map 3x3 -> 6x6 at 96 px), and a reloaded model is the same network."""
    cfg = ("model.backbone=resnet18", "model.width=0.25", "data.image_size=96")
    pooled = build_model(_cfg(*cfg)).get_layer("resnet18")
    fine = build_model(_cfg(*cfg, "model.stem_pool=false"))
    backbone = fine.get_layer("resnet18")
    assert backbone.count_params() == pooled.count_params()
    last = "stage4_block1_out"
    assert pooled.get_layer(last).output.shape[1:3] == (3, 3)
    assert backbone.get_layer(last).output.shape[1:3] == (6, 6)
    fine.save(tmp_path / "fine.keras")
    again = load_model(str(tmp_path / "fine.keras"))
    x = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 1)).astype("float32")
    assert "stem_pool" not in [layer.name for layer in again.get_layer("resnet18").layers]
    np.testing.assert_allclose(again.predict(x, verbose=0), fine.predict(x, verbose=0),
                               atol=1e-5)


def test_resnet18_stem_stride_one_convolves_every_pixel_before_the_pool(tmp_path):
    """model.stem_stride 1 (with the pool): the stem's output at full resolution, the
    stages where stride 2 without the pool puts them (the last feature map 6x6 at 96
    px), the same weights, and a reloaded model is the same network."""
    cfg = ("model.backbone=resnet18", "model.width=0.25", "data.image_size=96")
    strided = build_model(_cfg(*cfg, "model.stem_pool=false")).get_layer("resnet18")
    model = build_model(_cfg(*cfg, "model.stem_stride=1"))
    backbone = model.get_layer("resnet18")
    assert backbone.count_params() == strided.count_params()
    assert backbone.get_layer("stem_relu").output.shape[1:3] == (96, 96)
    assert strided.get_layer("stem_relu").output.shape[1:3] == (48, 48)
    for name in ("stage1_block1_out", "stage4_block1_out"):
        assert (backbone.get_layer(name).output.shape[1:3]
                == strided.get_layer(name).output.shape[1:3])
    model.save(tmp_path / "stride1.keras")
    again = load_model(str(tmp_path / "stride1.keras"))
    assert again.get_layer("resnet18").get_layer("stem_conv").strides == (1, 1)
    x = np.random.default_rng(2).uniform(0, 255, (2, 96, 96, 1)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)


def test_sex_film_modulates_every_stage_by_sex(tmp_path):
    """model.sex_film: the backbone takes [image, male], each stage's output passes a
    SexFiLM that starts as the identity; with stage 4's scale set to -1 for boys, a boy's
    features vanish and a girl's do not; a reloaded model is the same network."""
    from boneage_keras.model import SexFiLM

    cfg = ("model.backbone=resnet18", "model.width=0.25", "model.use_sex=true")
    plain = build_model(_cfg(*cfg))
    model = build_model(_cfg(*cfg, "model.sex_film=true"))
    backbone = model.get_layer("resnet18")
    films = [layer for layer in backbone.layers if isinstance(layer, SexFiLM)]
    assert [layer.name for layer in films] == [f"stage{k}_film" for k in range(1, 5)]
    assert len(backbone.inputs) == 2
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    male = np.array([[1.0], [0.0]], "float32")
    x = model.get_layer("preprocess")(images)
    sex = keras.ops.convert_to_tensor(male)
    plain_backbone = plain.get_layer("resnet18")
    plain_backbone.set_weights(
        [w for layer in backbone.layers if not isinstance(layer, SexFiLM)
         for w in layer.get_weights()])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(backbone([x, sex])),
                               keras.ops.convert_to_numpy(plain_backbone(x)), atol=1e-5)
    channels = films[-1].kernel.shape[1] // 2
    films[-1].kernel.assign(np.concatenate([-np.ones((1, channels)),
                                            np.zeros((1, channels))], axis=1))
    features = keras.ops.convert_to_numpy(backbone([x, sex]))
    assert np.abs(features[0]).max() == 0 and np.abs(features[1]).max() > 0.01
    model.save(tmp_path / "film.keras")
    again = load_model(str(tmp_path / "film.keras"))
    inputs = {"image": images, "male": male}
    np.testing.assert_allclose(again.predict(inputs, verbose=0),
                               model.predict(inputs, verbose=0), atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again.get_layer("resnet18")([x, sex]))[0], 0.0)


def test_attention_pool_starts_as_the_average_and_weighs_positions():
    """An untrained AttentionPool returns the global average once per head; a head whose
    logit is large at one position returns that position's channels; the others keep
    averaging."""
    from boneage_keras.model import AttentionPool

    x = np.random.default_rng(4).normal(size=(2, 3, 5, 6)).astype("float32")
    pool = AttentionPool(3)
    pooled = keras.ops.convert_to_numpy(pool(x)).reshape(2, 3, 6)
    np.testing.assert_allclose(pooled, np.repeat(x.mean(axis=(1, 2))[:, None], 3, 1),
                               atol=1e-5)
    # head 1 looks for channel 0: put a spike at position (2, 4) only there
    x[:, 2, 4, 0] = 100.0
    kernel = np.zeros((6, 3), "float32")
    kernel[0, 1] = 1.0
    pool.kernel.assign(kernel)
    pooled = keras.ops.convert_to_numpy(pool(x)).reshape(2, 3, 6)
    np.testing.assert_allclose(pooled[:, 1], x[:, 2, 4], atol=1e-4)
    np.testing.assert_allclose(pooled[:, 0], x.mean(axis=(1, 2)), atol=1e-4)
    weights = keras.ops.convert_to_numpy(pool.attention(x))
    assert weights.shape == (2, 15, 3) and weights[:, 2 * 5 + 4, 1].min() > 0.99


def test_squeeze_excite_gates_every_residual_branch(tmp_path):
    """model.squeeze_excite: each of ResNet18's 8 blocks gates its residual branch per
    channel; with a gate shut (the expand bias very negative) a stage-1 block passes its
    input on unchanged (identity shortcut, ReLU of a ReLU output); a reloaded model is
    the same network."""
    cfg = ("model.backbone=resnet18", "model.width=0.25", "model.stem_pool=false",
           "model.squeeze_excite=true")
    model = build_model(_cfg(*cfg))
    backbone = model.get_layer("resnet18")
    gates = [layer.name for layer in backbone.layers if layer.name.endswith("_se")]
    assert gates == [f"stage{s}_block{b}_se" for s in range(1, 5) for b in range(2)]
    assert backbone.get_layer("stage1_block0_se_reduce").units == 4
    assert backbone.get_layer("stage4_block1_se_reduce").units == 32
    x = model.get_layer("preprocess")(
        np.random.default_rng(5).uniform(0, 255, (2, 64, 64, 1)).astype("float32"))
    probe = keras.Model(backbone.inputs, [backbone.get_layer("stem_relu").output,
                                          backbone.get_layer("stage1_block0_out").output])
    stem, block = (keras.ops.convert_to_numpy(t) for t in probe(x))
    assert np.abs(block - stem).mean() > 1e-3 * np.abs(stem).mean()
    expand = backbone.get_layer("stage1_block0_se_expand")
    kernel, bias = expand.get_weights()
    expand.set_weights([np.zeros_like(kernel), np.full_like(bias, -50.0)])
    stem, block = (keras.ops.convert_to_numpy(t) for t in probe(x))
    np.testing.assert_allclose(block, stem, atol=1e-5)
    model.save(tmp_path / "se.keras")
    again = load_model(str(tmp_path / "se.keras"))
    images = np.random.default_rng(6).uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    np.testing.assert_allclose(again.predict(images, verbose=0),
                               model.predict(images, verbose=0), atol=1e-5)


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    """model.zero_init_residual: every block's last batch-norm scale starts at zero, so
    an untrained stage-1 block passes its input on unchanged (identity shortcut, ReLU
    of a ReLU output); without it the residual branch changes the block's output."""
    cfg = ("model.backbone=resnet18", "model.width=0.25", "model.stem_pool=false")
    x = np.random.default_rng(5).uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    for zero in (True, False):
        model = build_model(_cfg(*cfg, f"model.zero_init_residual={str(zero).lower()}"))
        backbone = model.get_layer("resnet18")
        gammas = [layer.get_weights()[0] for layer in backbone.layers
                  if layer.name.endswith("_b_bn")]
        assert len(gammas) == 8 and all((g == 0).all() == zero for g in gammas)
        probe = keras.Model(backbone.inputs, [backbone.get_layer("stem_relu").output,
                                              backbone.get_layer("stage1_block0_out").output])
        stem, block = (keras.ops.convert_to_numpy(t)
                       for t in probe(model.get_layer("preprocess")(x)))
        if zero:
            np.testing.assert_allclose(block, stem, atol=1e-6)
        else:
            assert np.abs(block - stem).mean() > 1e-3 * np.abs(stem).mean()


@pytest.mark.parametrize("avg_down", [True, False])
def test_avg_down_shortcut_sees_every_pixel(avg_down):
    """model.avg_down: a downsampling shortcut averages each 2x2 window before its 1x1
    convolution (ResNet-D); without it the strided 1x1 convolution reads one pixel in
    four. With that convolution copying its input channels and its batch norm the
    identity, the shortcut is the 2x2 average of stage 1's output, or every second
    pixel of it."""
    cfg = ("model.backbone=resnet18", "model.width=0.25", "model.stem_pool=false",
           f"model.avg_down={str(avg_down).lower()}")
    model = build_model(_cfg(*cfg))
    backbone = model.get_layer("resnet18")
    assert ("stage2_block0_down_pool" in [layer.name for layer in backbone.layers]) \
        == avg_down
    conv = backbone.get_layer("stage2_block0_down_conv")
    kernel = np.zeros(conv.kernel.shape, "float32")            # (1, 1, 16, 32)
    kernel[0, 0, np.arange(16), np.arange(16)] = 1.0
    conv.set_weights([kernel])
    bn = backbone.get_layer("stage2_block0_down_bn")
    bn.set_weights([np.ones(32), np.zeros(32), np.zeros(32), np.full(32, 1 - 1e-5)])
    x = model.get_layer("preprocess")(
        np.random.default_rng(7).uniform(0, 255, (2, 64, 64, 1)).astype("float32"))
    probe = keras.Model(backbone.inputs, [backbone.get_layer("stage1_block1_out").output,
                                          bn.output])
    stage1, shortcut = (keras.ops.convert_to_numpy(t) for t in probe(x))
    assert stage1.shape == (2, 32, 32, 16) and shortcut.shape == (2, 16, 16, 32)
    if avg_down:
        expected = stage1.reshape(2, 16, 2, 16, 2, 16).mean(axis=(2, 4))
    else:
        expected = stage1[:, ::2, ::2]
    np.testing.assert_allclose(shortcut[..., :16], expected, atol=1e-4)
    np.testing.assert_allclose(shortcut[..., 16:], 0.0, atol=1e-6)


def test_attention_and_squeeze_excite_learn_from_real_images(tmp_path, bulk_dir):
    """model.pooling: attention replaces ResNet18's average pooling by 4 heads (4x the
    features); five epochs on real radiographs move each head off the uniform
    weighting, and the squeeze-and-excitation gates then differ from radiograph to
    radiograph; the model reloads as the same network and Grad-CAM explains it."""
    images, ages = _real_images(bulk_dir, 192)
    cfg = ("model.backbone=resnet18", "model.width=0.25", "model.stem_pool=false")
    keras.utils.set_random_seed(1)   # the initial weights too: the same run every time
    model = build_model(_cfg(*cfg, "model.pooling=attention", "model.squeeze_excite=true"),
                        ages.mean(), ages.std())
    backbone = model.get_layer("resnet18")
    assert backbone.output.shape[-1] == 4 * 128
    assert build_model(_cfg(*cfg)).get_layer("resnet18").output.shape[-1] == 128
    pool = backbone.get_layer("attention_pool")
    model.compile(keras.optimizers.Adam(3e-3), loss="mae")
    model.fit(images, ages, batch_size=32, epochs=5, verbose=0)
    kernel = keras.ops.convert_to_numpy(pool.kernel)
    assert np.abs(kernel).max() > 1e-3
    # each head's weights over the 4 x 4 positions of the real images' feature maps
    features = keras.Model(backbone.inputs, backbone.get_layer(
        "stage4_block1_out").output)(model.get_layer("preprocess")(images[:8]))
    weights = keras.ops.convert_to_numpy(pool.attention(features))
    assert weights.shape == (8, 16, 4)
    assert (weights.max(axis=1) > 1.05 / 16).all(), "a head still weighs every position alike"
    gate = keras.Model(backbone.inputs, backbone.get_layer("stage3_block1_se_expand").output)
    gates = keras.ops.convert_to_numpy(gate(model.get_layer("preprocess")(images[:8])))
    assert gates.reshape(8, -1).std(axis=0).max() > 0.01
    _reloads_and_explains(model, images, tmp_path / "attention.keras")


def test_gem_pool_runs_from_the_average_to_the_maximum():
    """GeMPool at exponent 1 is the global average; at a large exponent each channel
    tends to its maximum; at 3 it lies between, above the average where the map is
    uneven; a map of zeros pools to (almost) zero, not NaN; an exponent below 1 is
    used as 1."""
    from boneage_keras.model import GeMPool

    x = np.random.default_rng(5).uniform(0, 2, size=(2, 4, 6, 3)).astype("float32")
    x[0, 1, 2, 0] = 40.0                      # one strongly responding position
    pool = GeMPool(p=1.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pool(x)), x.mean(axis=(1, 2)),
                               rtol=1e-5)
    pool.p.assign(np.array([80.0], "float32"))
    high = keras.ops.convert_to_numpy(pool(x))
    np.testing.assert_allclose(high, x.max(axis=(1, 2)), rtol=0.05)
    three = keras.ops.convert_to_numpy(GeMPool()(x))
    assert (three > x.mean(axis=(1, 2))).all() and (three < x.max(axis=(1, 2))).all()
    assert three[0, 0] > 3 * x[0, ..., 0].mean()   # the spike counts far more than in a mean
    zeros = keras.ops.convert_to_numpy(GeMPool()(np.zeros((1, 3, 3, 2), "float32")))
    assert np.isfinite(zeros).all() and zeros.max() < 1e-5
    pool.p.assign(np.array([0.0], "float32"))   # an exponent trained below 1 acts as 1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pool(x)), x.mean(axis=(1, 2)),
                               rtol=1e-5)


def test_gem_pooling_learns_its_exponent_on_real_images(tmp_path, bulk_dir):
    """model.pooling: gem pools ResNet18's last map by a power mean whose exponent
    training moves off 3 on real radiographs; the model reloads as the same network,
    exports to ONNX with the same months, and Grad-CAM explains it."""
    import onnxruntime

    from boneage_keras.export import keras_onnx

    images, ages = _real_images(bulk_dir, 192)
    keras.utils.set_random_seed(1)
    model = build_model(_cfg("model.backbone=resnet18", "model.width=0.25",
                             "model.stem_pool=false", "model.pooling=gem"),
                        ages.mean(), ages.std())
    backbone = model.get_layer("resnet18")
    assert backbone.output.shape[-1] == 128
    pool = backbone.get_layer("gem_pool")
    model.compile(keras.optimizers.Adam(3e-3), loss="mae")
    model.fit(images, ages, batch_size=32, epochs=3, verbose=0)
    assert abs(float(keras.ops.convert_to_numpy(pool.p)[0]) - 3.0) > 1e-3
    again = _reloads_and_explains(model, images, tmp_path / "gem.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(
        again.get_layer("resnet18").get_layer("gem_pool").p),
        keras.ops.convert_to_numpy(pool.p))
    keras_onnx(tmp_path / "gem.keras", tmp_path / "gem.onnx")
    runtime = onnxruntime.InferenceSession(str(tmp_path / "gem.onnx"))
    (name,) = [i.name for i in runtime.get_inputs()]
    np.testing.assert_allclose(runtime.run(None, {name: images[:4]})[0],
                               model.predict(images[:4], verbose=0), atol=1e-2)


def test_importing_the_package_registers_its_custom_objects(tmp_path):
    """After ``import boneage_keras``, plain ``keras.saving.load_model`` reads our files."""
    from conftest import run_python

    model = build_model(_cfg("model.backbone=resnet18"), 90.0, 30.0)
    model.compile(loss="mae", metrics=[__import__("boneage_keras.metrics").metrics
                                       .ToleranceAccuracy()])
    model.save(tmp_path / "m.keras")
    code = ("import keras, numpy as np, boneage_keras\n"
            f"m = keras.saving.load_model(r'{tmp_path / 'm.keras'}')\n"
            "print(float(m.predict(np.zeros((1, 64, 64, 1)), verbose=0)[0, 0]))\n")
    assert float(run_python(code).split()[-1]) == pytest.approx(90.0, abs=1e-3)
    without = "import keras\nkeras.saving.load_model(r'%s')\n" % (tmp_path / "m.keras")
    with pytest.raises(AssertionError, match="GrayPreprocess"):
        run_python(without)


def test_keras_is_imported_lazily_and_still_registers_our_objects(tmp_path):
    """``import boneage_keras`` loads no framework; Keras imported after it still
    finds the custom layers (the import hook in ``boneage_keras/__init__.py``)."""
    from conftest import run_python

    model = build_model(_cfg("model.backbone=resnet18"), 90.0, 30.0)
    model.save(tmp_path / "m.keras")
    code = ("import sys, numpy as np, boneage_keras\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
            "             ('keras', 'torch', 'tensorflow', 'jax')))\n"
            "import keras\n"
            f"m = keras.saving.load_model(r'{tmp_path / 'm.keras'}')\n"
            "print(float(m.predict(np.zeros((1, 64, 64, 1)), verbose=0)[0, 0]))\n")
    lines = run_python(code).split("\n")
    assert lines[0] == "[]"
    assert float(lines[1]) == pytest.approx(90.0, abs=1e-3)


def test_fused_batch_norm_matches_keras_and_replaces_it_in_the_backbones():
    """On torch, BatchNorm's one fused op per direction gives Keras' BatchNormalization's
    output, input and weight gradients and moving statistics (two training steps, then
    inference); every batch normalization of both backbones is one."""
    import torch

    from boneage_keras.model import BatchNorm, build_backbone

    assert keras.backend.backend() == "torch"
    rng = np.random.default_rng(0)
    keras_bn, fused = (cls(momentum=0.9, epsilon=1e-3)
                       for cls in (keras.layers.BatchNormalization, BatchNorm))
    for layer in (keras_bn, fused):
        layer.build((4, 6, 6, 16))
    keras_bn.set_weights([rng.normal(1, 0.2, 16), rng.normal(0, 0.2, 16),
                          rng.normal(0, 1, 16), rng.uniform(0.5, 2, 16)])
    fused.set_weights(keras_bn.get_weights())
    for step in range(2):
        x = rng.normal(3, 2, (4, 6, 6, 16)).astype("float32")
        grads = []
        for layer in (keras_bn, fused):
            xt = torch.tensor(x, requires_grad=True)
            y = layer(xt, training=True)
            (y * torch.linspace(-1, 1, 16)).pow(2).sum().backward()
            grads.append((y.detach().numpy(), xt.grad.numpy(),
                          layer.gamma.value.grad.numpy().copy(),
                          layer.beta.value.grad.numpy().copy()))
            layer.gamma.value.grad = layer.beta.value.grad = None
        for ours, theirs in zip(grads[1], grads[0]):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(fused.get_weights(), keras_bn.get_weights()):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    moved = keras_bn.get_weights()[2:]
    assert np.abs(moved[0]).max() > 0.5        # the moving statistics did move
    x = rng.normal(3, 2, (4, 6, 6, 16)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused(x, training=False)),
                               keras.ops.convert_to_numpy(keras_bn(x, training=False)),
                               rtol=1e-5, atol=1e-5)
    for name in ("resnet50", "resnet18"):
        norms = [layer for layer in build_backbone(name, 32, None).layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(type(layer) is BatchNorm for layer in norms), name


@pytest.mark.parametrize("options, shape", [
    ({"kernel_size": 3, "padding": "same"}, (2, 9, 9, 5)),
    ({"kernel_size": 3, "strides": 2, "padding": "same"}, (2, 10, 10, 5)),   # pads 0, 1
    ({"kernel_size": 7, "strides": 2, "padding": "same"}, (2, 11, 11, 5)),
    ({"kernel_size": 1, "strides": 2, "use_bias": True, "activation": "relu"},
     (2, 10, 10, 5)),
    ({"kernel_size": 3, "dilation_rate": 2}, (2, 12, 12, 5)),
])
def test_conv_matches_keras_conv2d_without_layout_copies(options, shape):
    """On torch, Conv gives Keras' Conv2D's output, input and kernel gradients, with
    none of the layout copies Keras' convolution makes of its input and kernel: its
    kernel (HWIO to Keras, set through set_weights) lies in OHWI memory, which torch's
    channels-last convolution takes as it is, and its gradient arrives in that memory."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from boneage_keras.model import Conv

    assert keras.backend.backend() == "torch"
    rng = np.random.default_rng(0)
    theirs, ours = keras.layers.Conv2D(8, **options), Conv(8, **options)
    for layer in (theirs, ours):
        layer.build(shape)
    ours.set_weights([rng.normal(size=w.shape).astype("float32")
                      for w in theirs.get_weights()])
    theirs.set_weights(ours.get_weights())
    x = rng.normal(size=shape).astype("float32")
    results, copies = [], []
    for layer in (theirs, ours):
        xt = torch.tensor(x, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = layer(xt)
        copies.append(sum(e.count for e in prof.key_averages() if e.key == "aten::clone"))
        (y * torch.linspace(-1, 1, 8)).pow(2).sum().backward()
        results.append((y.detach().numpy(), xt.grad.numpy(),
                        layer.kernel.value.grad.numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert copies[1] == 0 and copies[0] > 0, copies
    kernel = ours.kernel.value
    assert kernel.permute(3, 0, 1, 2).is_contiguous(), kernel.stride()
    assert kernel.grad.stride() == kernel.stride()


def test_the_backbones_convolve_and_pool_with_ours():
    from boneage_keras.model import Conv, MaxPool, build_backbone

    for name in ("resnet50", "resnet18"):
        backbone = build_backbone(name, 32, None).layers
        for keras_class, ours in ((keras.layers.Conv2D, Conv),
                                  (keras.layers.MaxPooling2D, MaxPool)):
            found = [layer for layer in backbone if isinstance(layer, keras_class)]
            assert found and all(type(layer) is ours for layer in found), name


@pytest.mark.parametrize("options, shape", [
    ({"pool_size": 3, "strides": 2}, (2, 11, 11, 4)),
    ({"pool_size": 3, "strides": 2, "padding": "same"}, (2, 12, 12, 4)),    # pads 0, 1
    ({"pool_size": 3, "strides": 1, "padding": "same"}, (2, 7, 7, 4)),
    ({"pool_size": 2, "strides": 2, "padding": "same"}, (2, 9, 9, 4)),
])
def test_max_pool_matches_keras_and_keeps_channels_last_memory(options, shape):
    """On torch, MaxPool gives Keras' MaxPooling2D's output and input gradient, and its
    output stays NHWC in memory (Keras' answers in NCHW memory, which every layer after
    it would inherit)."""
    import torch

    from boneage_keras.model import MaxPool

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    results = []
    for layer in (keras.layers.MaxPooling2D(**options), MaxPool(**options)):
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        (y * torch.linspace(-1, 1, shape[-1])).pow(2).sum().backward()
        results.append((y.detach().numpy(), xt.grad.numpy(), y.is_contiguous()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-6)
    assert results[1][2], "MaxPool's output is not NHWC in memory"


def test_a_compiled_step_through_our_layers_trains_as_eager():
    """torch.compile of a training step (train.jit_compile, the default on a GPU)
    through a backbone's stem: Conv, BatchNorm and the "same" MaxPool of ResNet18's
    stem. Keras' torch pooling pads "same" by replication, whose compiled backward
    failed on channels-last tensors; ours pads through ceil_mode. The compiled step
    gives eager's losses, and the only graph breaks are Keras' at the train step's
    backward() call."""
    import torch
    from torch._dynamo.utils import counters

    from boneage_keras.model import BatchNorm, Conv, MaxPool

    inputs = keras.Input((64, 64, 1))
    x = Conv(64, 7, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.Activation("relu")(BatchNorm()(x))
    x = MaxPool(3, strides=2, padding="same")(x)
    x = Conv(8, 3, padding="same")(x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0, 1, (4, 64, 64, 1)), dtype=torch.float32)
    y = torch.tensor(rng.uniform(0, 1, (4,)), dtype=torch.float32)
    losses, weights = [], None
    for compiled in (False, True):
        model = keras.Model(inputs, outputs)
        if weights is None:
            weights = [w.copy() for w in model.get_weights()]
        model.set_weights(weights)
        model.compile(keras.optimizers.Adam(0.01), "mae", jit_compile=compiled)
        counters.clear()
        losses.append([float(model.train_on_batch(x, y, return_dict=True)["loss"])
                       for _ in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    reasons = {reason.splitlines()[0] for reason in counters["graph_break"]}
    assert reasons == {"Unsupported Tensor.backward() call"}, reasons
