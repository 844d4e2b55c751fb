import dataclasses

import pytest

from boneage_keras.config import (
    _SECTION_CLASSES,
    Config,
    ConfigError,
    config_to_yaml,
    load_config,
)

CONFIGS = "configs"


def test_default_reproduces_resnet50_study():
    cfg = load_config(f"{CONFIGS}/default.yaml")
    assert cfg.model.backbone == "resnet50" and cfg.model.weights == "imagenet"
    assert cfg.data.image_size == 224 and cfg.train.batch_size == 64
    assert cfg.train.epochs == 50 and cfg.train.learning_rate == pytest.approx(5e-4)
    assert cfg.train.loss == "mae" and cfg.train.cosine_period_epochs == 10
    assert cfg.train.early_stopping_patience == 7 and cfg.data.val_fraction == 0.1
    assert (cfg.model.head_units, cfg.model.dropout) == (256, 0.3)
    assert cfg.augment.scale == [0.9, 1.1] and cfg.augment.rotation_degrees == 15


def test_resnet18_recipes_stack_on_default():
    base = load_config(f"{CONFIGS}/resnet18-baseline.yaml")
    assert base.model.backbone == "resnet18" and base.model.head_units == 0
    assert base.train.loss == "mse" and base.train.batch_size == 8
    assert base.train.weight_decay == pytest.approx(1e-4)
    assert (base.data.split, base.data.test_fraction) == ("stratified", 0.1)
    assert base.augment.rotation_degrees == 0 and base.augment.brightness == 0
    improved = load_config(f"{CONFIGS}/resnet18-improved.yaml")
    assert improved.model.head_units == 256 and improved.augment.salt_pepper == [0.03, 0.08]
    assert improved.augment.random_crop and improved.augment.blur_probability == 0.2
    assert improved.train.loss == "mse"  # inherited from the baseline


def test_dotted_and_bare_overrides():
    cfg = load_config(f"{CONFIGS}/default.yaml",
                      ["train.epochs=3", "model.backbone=resnet18", "image_size=96",
                       "model.weights=none", "augment.scale=[0.8, 1.2]"])
    assert cfg.train.epochs == 3 and cfg.model.backbone == "resnet18"
    assert cfg.data.image_size == 96 and cfg.model.weights is None
    assert cfg.augment.scale == [0.8, 1.2]


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["train.epoch", "epochs"]),
    ("nosection.x=1", ["nosection.x", "model"]),
    ("model.backbone=vgg", ["model.backbone", "resnet50"]),
    ("data.loader=fast", ["data.loader", "tfdata", "pydataset"]),
    ("train.batch_size=abc", ["train.batch_size", "integer"]),
    ("train.epochs=0", ["train.epochs", ">= 1"]),
    ("data.val_fraction=1.5", ["data.val_fraction"]),
    ("train.steps_per_epoch=0", ["train.steps_per_epoch", ">= 1"]),
    ("train.steps_per_epoch=-3", ["train.steps_per_epoch", "-3"]),
    ("train.warmup_epochs=-1", ["train.warmup_epochs", "0 <= x"]),
    ("train.warmup_epochs=51", ["train.warmup_epochs", "<= train.epochs"]),
    ("train.bn_refresh_batches=-1", ["train.bn_refresh_batches", "0 <= x <= 1000"]),
    ("train.early_stopping_patience=-2", ["train.early_stopping_patience", ">= 1"]),
    ("train.learning_rate=.inf", ["train.learning_rate", "> 0"]),
    ("train.cosine_period_epochs=0", ["train.cosine_period_epochs"]),
    ("train.min_learning_rate=0.1", ["train.min_learning_rate", "learning_rate"]),
    ("train.seed=-1", ["train.seed"]),
    ("data.age_range=[0, .inf]", ["data.age_range", "240"]),
    ("data.age_range=[100, 50]", ["data.age_range", "low < high"]),
    ("augment.rotation_degrees=400", ["augment.rotation_degrees", "180"]),
    ("augment.translation=-0.1", ["augment.translation"]),
    ("augment.engine=cuda", ["augment.engine", "keras-cv"]),
    ("model.head_activation=tanh", ["model.head_activation", "leaky_relu"]),
    ("model.width=0.5", ["model.width", "resnet18"]),          # default: ResNet50
    ("model.width=0", ["model.width", "0.125 <= x <= 4"]),
    ("model.stem_pool=false", ["model.stem_pool", "resnet18"]),  # default: ResNet50
    ("model.stem_stride=1", ["model.stem_stride", "resnet18"]),  # default: ResNet50
    ("model.stem_stride=3", ["model.stem_stride", "1 or 2"]),
    ("model.sex_film=true", ["model.sex_film", "model.use_sex"]),
    ("model.pooling=attention", ["model.pooling", "resnet18"]),  # default: ResNet50
    ("model.pooling=max", ["model.pooling", "attention"]),
    ("model.squeeze_excite=true", ["model.squeeze_excite", "resnet18"]),
    ("model.zero_init_residual=true", ["model.zero_init_residual", "resnet18"]),
    ("model.avg_down=true", ["model.avg_down", "resnet18"]),
    ("train.ema_decay=1", ["train.ema_decay", "0 < x < 1"]),
    ("train.swa_epochs=0", ["train.swa_epochs", "from 1 to train.epochs (50)"]),
    ("train.swa_epochs=51", ["train.swa_epochs", "from 1 to train.epochs (50)"]),
    ("train.swa_learning_rate=-1", ["train.swa_learning_rate", "> 0"]),
])
def test_bad_override_names_key_and_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(f"{CONFIGS}/default.yaml", [override])
    for word in words:
        assert word in str(err.value)


def test_weight_average_needs_one_replica():
    with pytest.raises(ConfigError, match="train.ema_decay.*one replica only"):
        load_config("cpu-bench", ["distribute.strategy=data_parallel", "train.ema_decay=0.999"])
    with pytest.raises(ConfigError, match="train.swa_epochs.*one replica only"):
        load_config("cpu-bench", ["distribute.strategy=data_parallel", "train.swa_epochs=5"])
    with pytest.raises(ConfigError, match="train.swa_epochs.*one weight average"):
        load_config("cpu-bench", ["train.ema_decay=0.999", "train.swa_epochs=5"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.epochz'"):
        load_config(path)


def test_interface_leaf_names_are_unique():
    names = [f.name for cls in _SECTION_CLASSES.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    for key in ("epochs", "batch_size", "image_size", "weights", "loader", "seed",
                "output_dir"):
        assert names.count(key) == 1


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(f"{CONFIGS}/resnet18-improved.yaml", ["train.epochs=2"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    again.name = cfg.name
    assert again == cfg
    assert isinstance(Config().to_dict()["train"], dict)


def test_missing_base_names_the_config_that_refers_to_it(tmp_path):
    child = tmp_path / "recipe.yaml"
    child.write_text("base: nowhere.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "recipe.yaml" in message and "nowhere.yaml" in message


def test_packaged_recipes_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("default").model.backbone == "resnet50"
    assert load_config("cpu-bench.yaml").model.backbone == "resnet18"   # base chain
    assert load_config("configs/resnet18-improved.yaml").augment.salt_pepper == [0.03, 0.08]
    with pytest.raises(ConfigError, match="packaged recipes: cpu-bench, default"):
        load_config("nonesuch")


def test_recipes_are_installed_with_the_package(tmp_path):
    """A plain (not editable) install carries configs/ as package data."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in (target / "boneage_keras" / "configs").iterdir()) == [
        "cpu-bench.yaml", "default.yaml", "gpu.yaml", "resnet18-baseline.yaml",
        "resnet18-improved.yaml"]
    code = ("import boneage_keras.config as c; from pathlib import Path;"
            "p = c.resolve_config_path('cpu-bench');"
            "print(p.parent.parent == Path(c.__file__).parent, "
            "c.load_config('cpu-bench').model.backbone)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(target),
                              "KERAS_BACKEND": "torch"})
    assert out.stdout.split() == ["True", "resnet18"], out.stderr[-2000:]
