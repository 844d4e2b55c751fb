"""RSNA bone-age tables: find the data, read the labels, clean them, split them.

Pure pandas/numpy: nothing here imports Keras or TensorFlow. Two layouts are read::

    Kaggle:  boneage-training-dataset.csv + boneage-training-dataset/<id>.png
             (also the nested boneage-training-dataset/boneage-training-dataset/)
    flat:    labels.csv + images/<id>.png

The cleaned table has columns ``id`` (str), ``boneage`` (float months), ``male``
(bool) and ``path`` (absolute image path).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import BoneAgeError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data") / "rsna-bone-age"
KAGGLE_DATASET = "kmader/rsna-bone-age"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AGE_GROUPS = ((0, 60), (61, 120), (121, 180), (181, 240))
AGE_RANGE = (0.0, 240.0)   # months: the RSNA labels' range (config data.age_range)


class DataError(BoneAgeError, ValueError):
    """The data set is missing or malformed; the message says where and how to fix it."""


@dataclass
class Layout:
    labels_csv: Path
    image_dir: Path


@dataclass
class CleaningReport:
    """What cleaning removed, by reason; each list holds the offending ids."""

    rows_read: int = 0
    bad_label: list[str] = field(default_factory=list)
    age_out_of_range: list[str] = field(default_factory=list)
    bad_sex: list[str] = field(default_factory=list)
    duplicate_id: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    unreadable_image: list[str] = field(default_factory=list)
    rows_kept: int = 0

    def summary(self) -> str:
        parts = [f"{self.rows_read} rows read"]
        for name in ("bad_label", "age_out_of_range", "bad_sex", "duplicate_id",
                     "missing_image", "unreadable_image"):
            ids = getattr(self, name)
            if ids:
                shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
                parts.append(f"{len(ids)} dropped for {name.replace('_', ' ')} ({shown})")
        parts.append(f"{self.rows_kept} kept")
        return "; ".join(parts)


def find_layout(data_dir: str | Path) -> Layout:
    """Locate the labels CSV and image folder of a data directory."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}. Pass --data-dir with the folder "
                        "that holds boneage-training-dataset.csv (Kaggle) or labels.csv + "
                        "images/.")
    kaggle_csv = root / "boneage-training-dataset.csv"
    for image_dir in (root / "boneage-training-dataset" / "boneage-training-dataset",
                      root / "boneage-training-dataset"):
        if kaggle_csv.is_file() and image_dir.is_dir():
            return Layout(kaggle_csv, image_dir)
    if (root / "labels.csv").is_file() and (root / "images").is_dir():
        return Layout(root / "labels.csv", root / "images")
    raise DataError(
        f"{root} holds no bone-age data set. Expected either "
        "boneage-training-dataset.csv with a boneage-training-dataset/ image folder "
        "(the Kaggle layout) or labels.csv with an images/ folder."
    )


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data directory to use: the given one, the default one, or a Kaggle download."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("BONEAGE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    if DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    return download_dataset()


def download_dataset() -> Path:
    """Download the RSNA data set from Kaggle with kagglehub (needs credentials)."""
    how = (
        "Get the data by hand from https://www.kaggle.com/datasets/kmader/rsna-bone-age "
        f"(unzip it to {DEFAULT_DATA_DIR}) or pass --data-dir with a folder that holds it; "
        "for the automatic download, set up Kaggle credentials (~/.kaggle/kaggle.json or "
        "KAGGLE_USERNAME/KAGGLE_KEY) on a machine with internet access."
    )
    try:
        import kagglehub
    except ImportError:
        raise DataError("no data directory given and kagglehub is not installed. " + how) \
            from None
    log.info("downloading %s with kagglehub ...", KAGGLE_DATASET)
    try:
        path = kagglehub.dataset_download(KAGGLE_DATASET)
    except Exception as err:  # noqa: BLE001 (network, credentials, quota: same end)
        raise DataError(f"could not download {KAGGLE_DATASET} ({type(err).__name__}: "
                        f"{err}). " + how) from None
    return Path(path)


def _parse_male(value: object) -> bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "m", "male", "1.0"):
        return True
    if text in ("false", "0", "f", "female", "0.0"):
        return False
    return None


def _find_image(image_dir: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = image_dir / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_labels(labels_csv: Path) -> pd.DataFrame:
    """Read a labels CSV with columns id, boneage, male (extra columns are kept)."""
    try:
        df = pd.read_csv(labels_csv, dtype={"id": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{labels_csv}: cannot be read as CSV ({err}).") from None
    missing = [c for c in ("id", "boneage", "male") if c not in df.columns]
    if missing:
        raise DataError(f"{labels_csv}: missing column(s) {', '.join(missing)}; found "
                        f"{', '.join(map(str, df.columns))}. Expected id,boneage,male as in "
                        "Kaggle's boneage-training-dataset.csv.")
    return df


def image_is_readable(path: Path) -> bool:
    """Cheap integrity check: PNG/JPEG header and chunk checksums, no full decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 (PIL raises many types for broken files)
        return False


def clean_table(df: pd.DataFrame, image_dir: Path, check_images: bool = True,
                strict: bool = False, source: str = "labels",
                age_range: tuple[float, float] | list[float] = AGE_RANGE,
                ) -> tuple[pd.DataFrame, CleaningReport]:
    """Drop rows that cannot be trained on, reporting each reason with counts and ids:
    ages that are missing, not numbers or not finite (``bad_label``), ages outside
    ``age_range`` months (``age_out_of_range``), unreadable sex, duplicate ids, missing
    or undecodable images.

    With ``strict`` any dropped row is an error instead.
    """
    report = CleaningReport(rows_read=len(df))
    df = df.copy()
    df["id"] = df["id"].astype(str).str.strip()
    ages = pd.to_numeric(df["boneage"], errors="coerce")
    bad = ages.isna() | ~np.isfinite(ages.fillna(0).to_numpy(np.float64))
    report.bad_label = df.loc[bad, "id"].tolist()
    df, ages = df.loc[~bad], ages[~bad].astype(float)
    low, high = age_range
    outside = (ages < low) | (ages > high)
    report.age_out_of_range = df.loc[outside, "id"].tolist()
    df = df.loc[~outside].assign(boneage=ages[~outside])

    male = df["male"].map(_parse_male)
    bad = male.isna()
    report.bad_sex = df.loc[bad, "id"].tolist()
    df = df.loc[~bad].assign(male=male[~bad].astype(bool))

    dup = df["id"].duplicated(keep="first")
    report.duplicate_id = df.loc[dup, "id"].tolist()
    df = df.loc[~dup]

    paths = df["id"].map(lambda i: _find_image(image_dir, i))
    report.missing_image = df.loc[paths.isna(), "id"].tolist()
    df = df.loc[paths.notna()].assign(path=paths[paths.notna()].map(lambda p: str(p.resolve())))

    if check_images and len(df):
        with ThreadPoolExecutor(max_workers=8) as pool:
            ok = np.array(list(pool.map(lambda p: image_is_readable(Path(p)), df["path"])))
        report.unreadable_image = df.loc[~ok, "id"].tolist()
        for path in df.loc[~ok, "path"]:
            log.warning("skipping unreadable image %s", path)
        df = df.loc[ok]
    report.rows_kept = len(df)

    dropped = report.rows_read - report.rows_kept
    if strict and dropped:
        raise DataError(f"{source}: strict mode and {dropped} row(s) cannot be used: "
                        f"{report.summary()}. Fix those rows/files or set data.strict=false.")
    if report.rows_kept == 0:
        raise DataError(f"{source}: no usable rows ({report.summary()}).")
    return df[["id", "boneage", "male", "path"]].reset_index(drop=True), report


def load_dataset(data_dir: str | Path | None, strict: bool = False,
                 check_images: bool = True,
                 age_range: tuple[float, float] | list[float] = AGE_RANGE,
                 ) -> tuple[pd.DataFrame, CleaningReport, Path]:
    """Find, read and clean a data set; returns (table, report, data_dir)."""
    root = resolve_data_dir(data_dir)
    layout = find_layout(root)
    df = read_labels(layout.labels_csv)
    table, report = clean_table(df, layout.image_dir, check_images=check_images,
                                strict=strict, source=str(layout.labels_csv),
                                age_range=age_range)
    log.info("%s: %s", layout.labels_csv, report.summary())
    return table, report, root


def age_bins(ages: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Quantile bins of bone age, for stratified splits."""
    edges = np.unique(np.quantile(ages, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.digitize(ages, edges)


def split_table(df: pd.DataFrame, method: str = "random", val_fraction: float = 0.1,
                test_fraction: float = 0.0, seed: int = 42) -> pd.DataFrame:
    """Add a ``split`` column (train/val/test), deterministic from ``seed``.

    ``stratified`` keeps the bone-age distribution (decile bins) equal across splits.
    """
    from sklearn.model_selection import train_test_split

    n = len(df)
    n_val = max(1, round(n * val_fraction))
    n_test = round(n * test_fraction) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise DataError(f"only {n} usable images: too few for a validation fraction of "
                        f"{val_fraction} and a test fraction of {test_fraction}.")
    index = np.arange(n)

    def cut(idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        strat = None
        if method == "stratified":
            bins = age_bins(df["boneage"].to_numpy()[idx])
            counts = np.bincount(bins)
            if counts[counts > 0].min() >= 2 and size >= len(counts[counts > 0]):
                strat = bins
        return train_test_split(idx, test_size=size, random_state=seed, stratify=strat)

    split = np.array(["train"] * n, dtype=object)
    rest = index
    if n_test:
        rest, test_idx = cut(index, n_test)
        split[test_idx] = "test"
    _, val_idx = cut(rest, n_val)
    split[val_idx] = "val"
    return df.assign(split=split)


def subsample(df: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of at most ``max_images`` rows (all rows if None)."""
    if max_images is None or max_images >= len(df):
        return df
    return df.sample(n=max_images, random_state=seed).sort_index().reset_index(drop=True)


def age_group_label(low: int, high: int) -> str:
    return f"{low}-{high}"


def assign_age_group(ages: np.ndarray) -> np.ndarray:
    """Label each bone age (months) with its study age group; ages > 240 join the last."""
    labels = np.empty(len(ages), dtype=object)
    for low, high in AGE_GROUPS:
        lo = -np.inf if low == 0 else low - 1
        mask = (ages > lo) & (ages <= high)
        labels[mask] = age_group_label(low, high)
    labels[ages > AGE_GROUPS[-1][1]] = age_group_label(*AGE_GROUPS[-1])
    return labels
