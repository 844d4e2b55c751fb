"""Experiment configuration: dataclasses, stacked YAML files and dotted overrides.

A config file is YAML with up to five sections (``data``, ``augment``, ``model``,
``train``, ``distribute``) and an optional ``base:`` naming another config file (relative to the
file itself) whose values it overrides, so a recipe is a small file on top of
``default.yaml``. Command-line overrides use dotted keys::

    cfg = load_config("configs/default.yaml", ["train.epochs=3", "data.image_size=96"])

Every leaf name is unique across sections, so a key is unambiguous in logs and errors.
Unknown keys and bad values raise :class:`ConfigError` naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import BoneAgeError

BACKBONES = ("resnet50", "resnet18", "efficientnetb0", "inceptionv3")


class ConfigError(BoneAgeError, ValueError):
    """A config file or override is invalid; the message says which key and why."""


@dataclass
class DataConfig:
    """Where the images are and how they are read, cleaned and split."""

    data_dir: str | None = None  # None: ./data/rsna-bone-age, else kagglehub download
    image_size: int = 224
    resize: Literal["pad", "stretch"] = "pad"
    crop_hand: bool = False  # crop to the hand (threshold + largest region) before resize
    split: Literal["random", "stratified"] = "random"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    # the "calibration" split: held out from training and from choosing the checkpoint;
    # the end of training fits the run's bias correction and 90% interval on it
    calibration_fraction: float = 0.05
    max_images: int | None = None  # use a seeded random subset (quick experiments)
    # images set aside first as the "selection" split (stratified by age and sex, from a
    # fixed seed, whatever train.seed is): only compares finished recipes; 0: none
    selection_size: int = 0
    strict: bool = False  # unreadable images are errors instead of skipped
    max_unreadable: int = 10  # images that fail to decode mid-run: skipped up to this
    age_range: list[float] = field(default_factory=lambda: [0.0, 240.0])  # months kept
    loader: Literal["auto", "tfdata", "pydataset"] = "auto"  # auto: tfdata if TF imports
    workers: int = 2
    use_cache: bool = True  # read a `boneage prepare` cache when one fits
    cache_dir: str | None = None  # None: <data_dir>/.boneage-cache


@dataclass
class AugmentConfig:
    """Training-time augmentation; each stage is off when its value is 0/false/null."""

    horizontal_flip: bool = True
    rotation_degrees: float = 15.0
    translation: float = 0.1  # fraction of the image size
    scale: list[float] | None = field(default_factory=lambda: [0.9, 1.1])
    shear: float = 0.0
    brightness: float = 0.3  # additive, fraction of the 0-255 range
    contrast: list[float] | None = field(default_factory=lambda: [0.7, 1.3])
    blur_probability: float = 0.0
    salt_pepper: list[float] | None = None  # fraction of pixels, e.g. [0.03, 0.08]
    random_crop: bool = False  # crop image_size from a 1/0.875 larger resize
    # C-Mixup: blend each training image (and its age) with a same-sex partner from its
    # batch, lam ~ Beta(alpha, alpha); 0: off. Partners of similar age are likelier:
    # kernel width mixup_sigma months (null: any partner, plain mixup)
    mixup_alpha: float = 0.0
    mixup_sigma: float | None = 12.0
    # auto: keras-cv if TF imports, else numpy (fused NumPy stages, the fastest)
    engine: Literal["auto", "keras-cv", "keras", "numpy"] = "auto"


@dataclass
class ModelConfig:
    """Backbone, pretrained weights and regression head."""

    backbone: str = "resnet50"
    weights: str | None = "imagenet"  # imagenet | none | path to a weights file
    head_units: int = 256  # 0: linear head Dense(1)
    head_activation: Literal["relu", "leaky_relu", "gelu"] = "relu"  # of the hidden layer
    dropout: float = 0.3
    use_sex: bool = False
    standardize: bool = False  # each image to the same mean and spread, in the model
    width: float = 1.0  # ResNet18's channels scaled (0.5: 32-64-128-256); others: 1 only
    stem_pool: bool = True  # ResNet18's stem max-pool; false: stages at twice the resolution
    stem_stride: int = 2  # ResNet18's stem convolution; 1 (with the pool): the 7x7 sees every pixel
    # the sex also scales and shifts every ResNet18 stage's channels (FiLM), besides
    # entering the head; needs use_sex
    sex_film: bool = False
    # ResNet18's pooling of its last feature map: avg (global average), attention
    # (4 learned spatial weightings of it, 4x the features) or gem (generalized mean,
    # a learned power between the average and the maximum); the others: avg only
    pooling: Literal["avg", "attention", "gem"] = "avg"
    # every ResNet18 block's residual branch gated per channel from its global average
    # (squeeze-and-excitation, Hu et al. 2018)
    squeeze_excite: bool = False
    # every ResNet18 block's last batch norm starts at scale zero, so each block starts
    # as its shortcut (Goyal et al. 2017)
    zero_init_residual: bool = False
    # ResNet18's downsampling shortcuts average each 2x2 window before their 1x1
    # convolution instead of striding past three of its four pixels (ResNet-D, He et
    # al. 2019, "Bag of Tricks")
    avg_down: bool = False
    # the head predicts probabilities over 1-month bins spanning data.age_range and
    # returns their expected age (false: one linear output scaled to months)
    age_distribution: bool = False
    # ordinal regression (CORAL): one score per image against a learned threshold
    # between each two 1-month bins of data.age_range; the age is the lowest bin plus
    # the sum of the thresholds' probabilities (train.loss: coral trains each threshold)
    ordinal: bool = False


@dataclass
class TrainConfig:
    """Optimisation, callbacks and where run directories go."""

    epochs: int = 50
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    # ldl: label-distribution learning (needs model.age_distribution): KL divergence
    # from a Gaussian of ldl_sigma months around the true age, plus ldl_l1_weight x
    # the expected age's absolute error in years
    # coral: ordinal regression (needs model.ordinal): the summed binary cross-entropy
    # of every threshold's "older than this" against the true age (Cao et al. 2020)
    loss: Literal["mae", "mse", "huber", "ldl", "coral"] = "mae"
    ldl_sigma: float = 8.0
    ldl_l1_weight: float = 1.0
    # training images weighted by (count of their 12-month age bin) ** -x, mean weight 1:
    # rare ages (the youngest and oldest) count more; 0: off, 1: inverse frequency
    age_balance: float = 0.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    cosine_period_epochs: int | None = None  # None: one decay over all epochs
    warmup_epochs: int = 0  # epoch k of the first N at k/N of the rate (N=1: one full-rate epoch)
    min_learning_rate: float = 0.0
    early_stopping_patience: int | None = 7
    # what picks best.keras and stops early: the highest validation +-tolerance accuracy,
    # the lowest validation MAE or RMSE, or the last epoch (for a schedule that decays
    # to zero; no early stopping)
    monitor: Literal["val_tolerance_accuracy", "val_mae", "val_rmse", "last"] = \
        "val_tolerance_accuracy"
    # before each validation, the backbone's batch-norm statistics are recomputed from
    # this many batches of (unaugmented) training images with the weights as they are:
    # the moving averages lag fast-changing weights (0: off; one replica only)
    bn_refresh_batches: int = 8
    # validation, best.keras and last.keras use an exponential moving average of the
    # weights, updated every step with this decay (0.999: about the last 1,000 steps);
    # None: off (the weights as trained)
    ema_decay: float | None = None
    # stochastic weight averaging: over the last swa_epochs epochs the rate holds at
    # swa_learning_rate (the schedule before decays to it; None: a tenth of
    # learning_rate), and validation, best.keras and last.keras use the equal-weight
    # average of the weights at those epochs' ends; None: off
    swa_epochs: int | None = None
    swa_learning_rate: float | None = None
    tolerance_months: float = 12.0
    steps_per_epoch: int | None = None
    mixed_precision: bool = False
    jit_compile: bool | None = None  # None: XLA/compiled steps only when a GPU is present
    seed: int = 42
    output_dir: str = "runs"
    run_name: str | None = None  # None: <config name>-<timestamp>


@dataclass
class DistributeConfig:
    """One replica or many (see boneage_keras/distribute.py and
    docs/distributed.md); ``train.batch_size`` stays the global batch."""

    strategy: Literal["none", "data_parallel"] = "none"
    devices: int | None = None  # replicas in this process (JAX, TF); None: every GPU
    cpu_devices: int | None = None  # JAX/TF without a GPU: split the CPU into N devices
    sync_batchnorm: bool = False  # TF: synchronized batch statistics (JAX: always global)
    scale_lr: Literal["none", "linear"] = "none"  # linear: lr x batch_size / lr_batch_size
    lr_batch_size: int = 64  # the global batch train.learning_rate was chosen for
    timeout_s: int = 120  # a lost process stops the others after this long
    coordinator: str | None = None  # JAX multi-process: host:port of process 0
    num_processes: int | None = None  # JAX multi-process (else KERAS_DISTRIBUTION_*)
    process_id: int | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    name: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def geometry(data: DataConfig) -> str:
    """How images are brought to a square: ``data.resize`` (pad or stretch), after
    cropping to the hand with ``data.crop_hand`` (``hand+pad``, ``hand+stretch``)."""
    return f"hand+{data.resize}" if data.crop_hand else data.resize


_SECTION_CLASSES = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "distribute": DistributeConfig,
}


def _leaf_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    leaves: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            leaves[f.name] = (section, f)
    return leaves


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0])
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}.")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise bad


def _validate(cfg: Config) -> None:
    """Ranges and combinations: every numeric key has one, named in the message."""
    d, a, m, t = cfg.data, cfg.augment, cfg.model, cfg.train

    def check(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': got {value!r}, expected {allowed}.")

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    check(d.image_size >= 32, "data.image_size", d.image_size, "an integer >= 32")
    check(finite(d.val_fraction) and 0 < d.val_fraction < 1, "data.val_fraction",
          d.val_fraction, "0 < x < 1")
    check(
        finite(d.test_fraction) and 0 <= d.test_fraction < 1
        and d.val_fraction + d.test_fraction < 1,
        "data.test_fraction",
        d.test_fraction,
        "0 <= x < 1 with val_fraction + test_fraction < 1",
    )
    check(
        finite(d.calibration_fraction) and 0 <= d.calibration_fraction < 0.5
        and d.val_fraction + d.test_fraction + d.calibration_fraction < 1,
        "data.calibration_fraction", d.calibration_fraction,
        "0 <= x < 0.5 with val_fraction + test_fraction + calibration_fraction < 1")
    check(d.max_images is None or d.max_images >= 10, "data.max_images", d.max_images,
          "null or an integer >= 10")
    check(d.selection_size >= 0, "data.selection_size", d.selection_size,
          "an integer >= 0 (0: no selection split)")
    check(d.workers >= 1, "data.workers", d.workers, "an integer >= 1")
    check(d.max_unreadable >= 0, "data.max_unreadable", d.max_unreadable, "an integer >= 0")
    check(len(d.age_range) == 2 and all(map(finite, d.age_range))
          and 0 <= d.age_range[0] < d.age_range[1], "data.age_range", d.age_range,
          "[low, high] months with 0 <= low < high (RSNA: [0, 240])")
    check(finite(a.rotation_degrees) and 0 <= a.rotation_degrees <= 180,
          "augment.rotation_degrees", a.rotation_degrees, "0 <= x <= 180 degrees")
    for key, value in (("augment.translation", a.translation), ("augment.shear", a.shear),
                       ("augment.brightness", a.brightness)):
        check(finite(value) and 0 <= value < 1, key, value, "a fraction 0 <= x < 1")
    check(m.backbone in BACKBONES, "model.backbone", m.backbone, "one of " + ", ".join(BACKBONES))
    check(finite(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout, "0 <= x < 1")
    check(finite(m.width) and 0.125 <= m.width <= 4 and (m.width == 1 or m.backbone == "resnet18"),
          "model.width", m.width, "0.125 <= x <= 4, and 1 unless model.backbone is resnet18 "
          "(the Keras applications have fixed widths)")
    check(m.stem_pool or m.backbone == "resnet18", "model.stem_pool", m.stem_pool,
          "true unless model.backbone is resnet18 (the Keras applications have a fixed stem)")
    check(m.stem_stride in (1, 2) and (m.stem_stride == 2 or m.backbone == "resnet18"),
          "model.stem_stride", m.stem_stride,
          "1 or 2, and 2 unless model.backbone is resnet18 (the Keras applications have a "
          "fixed stem)")
    check(not m.sex_film or (m.use_sex and m.backbone == "resnet18"), "model.sex_film",
          m.sex_film, "false unless model.use_sex is true and model.backbone is resnet18 "
          "(the stages it modulates are ResNet18's; set model.use_sex=true)")
    check(m.pooling == "avg" or m.backbone == "resnet18", "model.pooling", m.pooling,
          "avg unless model.backbone is resnet18 (the Keras applications are built "
          "average-pooled)")
    check(not m.squeeze_excite or m.backbone == "resnet18", "model.squeeze_excite",
          m.squeeze_excite, "false unless model.backbone is resnet18 (the Keras "
          "applications have fixed blocks)")
    check(not m.zero_init_residual or m.backbone == "resnet18", "model.zero_init_residual",
          m.zero_init_residual, "false unless model.backbone is resnet18 (the Keras "
          "applications bring their own initialisation)")
    check(not m.avg_down or m.backbone == "resnet18", "model.avg_down", m.avg_down,
          "false unless model.backbone is resnet18 (the Keras applications have fixed "
          "blocks)")
    check(m.head_units >= 0, "model.head_units", m.head_units, "an integer >= 0")
    check(t.loss != "ldl" or m.age_distribution, "train.loss", t.loss,
          "mae, mse or huber unless model.age_distribution is true (ldl learns the "
          "distribution that head predicts: set model.age_distribution=true)")
    check(t.loss != "coral" or m.ordinal, "train.loss", t.loss,
          "mae, mse or huber unless model.ordinal is true (coral trains that head's "
          "thresholds: set model.ordinal=true)")
    check(not (m.ordinal and m.age_distribution), "model.ordinal", m.ordinal,
          "false while model.age_distribution is true (one age head at a time)")
    check(finite(t.ldl_sigma) and t.ldl_sigma > 0, "train.ldl_sigma", t.ldl_sigma,
          "a number of months > 0")
    check(finite(t.ldl_l1_weight) and t.ldl_l1_weight >= 0, "train.ldl_l1_weight",
          t.ldl_l1_weight, "a number >= 0 (0: the KL divergence alone)")
    check(t.ema_decay is None or (finite(t.ema_decay) and 0 < t.ema_decay < 1),
          "train.ema_decay", t.ema_decay, "null (off) or a number 0 < x < 1 such as 0.999")
    check(t.ema_decay is None or cfg.distribute.strategy == "none", "train.ema_decay",
          t.ema_decay, "null with distribute.strategy data_parallel (one replica only)")
    check(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    check(t.swa_epochs is None or 1 <= t.swa_epochs <= t.epochs, "train.swa_epochs",
          t.swa_epochs, f"null (off) or an integer from 1 to train.epochs ({t.epochs})")
    check(t.swa_epochs is None or not t.ema_decay, "train.swa_epochs", t.swa_epochs,
          "null while train.ema_decay is set (one weight average at a time)")
    check(t.swa_epochs is None or cfg.distribute.strategy == "none", "train.swa_epochs",
          t.swa_epochs, "null with distribute.strategy data_parallel (one replica only)")
    check(t.swa_learning_rate is None
          or (finite(t.swa_learning_rate) and t.swa_learning_rate > 0),
          "train.swa_learning_rate", t.swa_learning_rate,
          "null (a tenth of train.learning_rate) or a number > 0")
    check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    check(finite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate",
          t.learning_rate, "a number > 0")
    check(finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
          t.weight_decay, "a number >= 0")
    check(finite(t.age_balance) and 0 <= t.age_balance <= 1, "train.age_balance",
          t.age_balance, "0 <= x <= 1 (0: off, 1: inverse age-bin frequency)")
    check(finite(t.min_learning_rate) and 0 <= t.min_learning_rate < t.learning_rate,
          "train.min_learning_rate", t.min_learning_rate, "0 <= x < train.learning_rate")
    check(t.cosine_period_epochs is None or t.cosine_period_epochs >= 1,
          "train.cosine_period_epochs", t.cosine_period_epochs, "null or an integer >= 1")
    # <= (not <): a recipe with a warm-up still runs with train.epochs=1 for a quick try
    check(0 <= t.warmup_epochs <= t.epochs, "train.warmup_epochs", t.warmup_epochs,
          "an integer 0 <= x <= train.epochs")
    check(0 <= t.bn_refresh_batches <= 1000, "train.bn_refresh_batches",
          t.bn_refresh_batches, "an integer 0 <= x <= 1000 (0: off)")
    check(t.early_stopping_patience is None or t.early_stopping_patience >= 1,
          "train.early_stopping_patience", t.early_stopping_patience,
          "null (off) or an integer >= 1")
    check(t.monitor != "last" or t.early_stopping_patience is None, "train.monitor",
          t.monitor, "a validation metric while train.early_stopping_patience is set (the "
          "last epoch is always the best: set train.early_stopping_patience=null)")
    check(t.steps_per_epoch is None or t.steps_per_epoch >= 1, "train.steps_per_epoch",
          t.steps_per_epoch, "null (the whole split) or an integer >= 1")
    check(finite(t.tolerance_months) and t.tolerance_months > 0, "train.tolerance_months",
          t.tolerance_months, "a number > 0")
    check(0 <= t.seed < 2**31, "train.seed", t.seed, "an integer 0 <= x < 2**31")
    for key, rng in (("augment.scale", a.scale), ("augment.contrast", a.contrast)):
        check(rng is None or (len(rng) == 2 and all(map(finite, rng))
                              and 0 < rng[0] <= rng[1]), key, rng,
              "null or [low, high] with 0 < low <= high")
    check(a.salt_pepper is None or (len(a.salt_pepper) == 2
          and 0 <= a.salt_pepper[0] <= a.salt_pepper[1] < 1),
          "augment.salt_pepper", a.salt_pepper, "null or [low, high] fractions in [0, 1)")
    check(finite(a.blur_probability) and 0 <= a.blur_probability <= 1,
          "augment.blur_probability", a.blur_probability, "a probability in [0, 1]")
    check(finite(a.mixup_alpha) and 0 <= a.mixup_alpha <= 10, "augment.mixup_alpha",
          a.mixup_alpha, "0 (off) or a Beta parameter 0 < x <= 10 such as 0.5")
    check(a.mixup_sigma is None or (finite(a.mixup_sigma) and a.mixup_sigma > 0),
          "augment.mixup_sigma", a.mixup_sigma,
          "null (any partner: plain mixup) or a number of months > 0 such as 12")
    s = cfg.distribute
    for key, value in (("distribute.devices", s.devices),
                       ("distribute.cpu_devices", s.cpu_devices),
                       ("distribute.num_processes", s.num_processes)):
        check(value is None or value >= 1, key, value, "null or an integer >= 1")
    check(s.process_id is None or s.process_id >= 0, "distribute.process_id", s.process_id,
          "null or an integer >= 0 (0 is the chief)")
    check(s.lr_batch_size >= 1, "distribute.lr_batch_size", s.lr_batch_size,
          "an integer >= 1")
    check(s.timeout_s >= 5, "distribute.timeout_s", s.timeout_s, "an integer >= 5 seconds")
    check(s.strategy == "data_parallel" or not (s.cpu_devices or s.devices
                                                 or (s.num_processes or 1) > 1),
          "distribute.strategy", s.strategy,
          "data_parallel when distribute.devices, cpu_devices or num_processes are set")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, merging its ``base:`` chain (base first)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself.")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass an existing YAML file "
                          "(see configs/ for examples).")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level.")
    base = raw.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        base_path = path.parent / str(base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: its 'base: {base}' names a file that does not "
                              f"exist ({base_path}); fix the base line (relative to "
                              f"{path.parent}) or remove it.")
        merged = _read_yaml(base_path, seen + (path,))
    for section, values in raw.items():
        if section in _SECTION_CLASSES:
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping.")
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return merged


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from nested dicts (as read from YAML)."""
    cfg = Config()
    for section, values in raw.items():
        if section == "name":
            cfg.name = str(values)
            continue
        if section not in _SECTION_CLASSES:
            raise ConfigError(
                f"{source}: unknown section '{section}'. Allowed: "
                + ", ".join(_SECTION_CLASSES) + "."
            )
        target = getattr(cfg, section)
        cls = _SECTION_CLASSES[section]
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in (values or {}).items():
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown key '{section}.{key}'. Keys of '{section}': "
                    + ", ".join(names) + "."
                )
            setattr(target, key, _coerce(value, _type_of(cls, key), f"{section}.{key}"))
    if isinstance(cfg.model.weights, str) and cfg.model.weights.lower() == "none":
        cfg.model.weights = None
    _validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """``'train.epochs=3'`` -> ``('train', 'epochs', 3)``; a bare leaf name also works."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. train.epochs=3.")
    key, value = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    leaves = _leaf_fields()
    if len(parts) == 1 and parts[0] in leaves:
        parts = [leaves[parts[0]][0], parts[0]]
    if len(parts) != 2 or parts[0] not in _SECTION_CLASSES:
        raise ConfigError(
            f"override '{text}': unknown key '{key}'. Use SECTION.KEY with a section of "
            + ", ".join(_SECTION_CLASSES) + " (e.g. model.backbone=resnet18)."
        )
    return parts[0], parts[1], yaml.safe_load(value) if value.strip() else None


def packaged_configs() -> dict[str, Path]:
    """The recipes shipped with the package (``configs/*.yaml``), by name."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):   # installed, checkout
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    return {}


def resolve_config_path(path: str | Path) -> Path:
    """A config file: ``path`` if it exists, else a packaged recipe of that name
    (``default``, ``default.yaml`` or ``configs/default.yaml`` work from any folder)."""
    given = Path(path)
    if given.is_file():
        return given
    recipes = packaged_configs()
    name = given.name.removesuffix(".yaml")
    if name in recipes and (given.parent == Path(".") or given.parent.name == "configs"):
        return recipes[name]
    raise ConfigError(f"config file not found: {path}. Pass a YAML file or one of the "
                      "packaged recipes: " + ", ".join(recipes) + ".")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a file, or a packaged recipe by name, with its ``base``
    chain) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        raw = _read_yaml(resolve_config_path(path))
        source = str(path)
        raw.setdefault("name", Path(path).stem)
    for text in overrides or []:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, source)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
