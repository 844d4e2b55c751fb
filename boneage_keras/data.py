"""RSNA bone-age tables: find the data, read the labels, clean them, split them.

Pure pandas/numpy: nothing here imports Keras or TensorFlow. Two layouts are read::

    Kaggle:  boneage-training-dataset.csv + boneage-training-dataset/<id>.png
             (also the nested boneage-training-dataset/boneage-training-dataset/)
    flat:    labels.csv + images/<id>.png

The cleaned table has columns ``id`` (str), ``boneage`` (float months), ``male``
(bool) and ``path`` (absolute image path).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError
from .extras import install_hint
from .files import may_write, write_csv
from .patient import parse_sex

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data") / "rsna-bone-age"
KAGGLE_DATASET = "kmader/rsna-bone-age"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".dcm")
AGE_GROUPS = ((0, 60), (61, 120), (121, 180), (181, 240))
CACHE_DIRNAME = ".boneage-cache"   # prepared images and the decode record live here
CACHE_ENV = "BONEAGE_CACHE_DIR"
DECODED_RECORD = "decoded.csv"
AGE_BALANCE_BIN_MONTHS = 12.0  # the bins of train.age_balance
AGE_RANGE = (0.0, 240.0)   # months: the RSNA labels' range (config data.age_range)


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
        raise DataError("no data directory given and kagglehub is not installed "
                        f"({install_hint('kagglehub')}). " + how) from None
    log.info("downloading %s with kagglehub ...", KAGGLE_DATASET)
    try:
        path = kagglehub.dataset_download(KAGGLE_DATASET)
    except Exception as err:  # noqa: BLE001 (network, credentials, quota: same end)
        raise DataError(f"could not download {KAGGLE_DATASET} ({type(err).__name__}: "
                        f"{err}). " + how) from None
    return Path(path)


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


def decode_problem(path: str) -> str | None:
    """None if the image decodes completely (every pixel, not only the header), else
    the reason it does not."""
    from PIL import Image

    from .dicom import DicomError, is_dicom, read_dicom_pixels

    if is_dicom(path):
        try:
            read_dicom_pixels(path)
            return None
        except DicomError as err:
            return str(err)
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as err:  # noqa: BLE001 (PIL raises many types for broken files)
        return f"{type(err).__name__}: {err}"


def verify_images(paths: list[str], record_dir: Path | None) -> dict[str, str]:
    """Decode every image once; returns {path: reason} for those that fail.

    What was decoded is remembered in ``record_dir/decoded.csv`` by (path, byte size,
    modification time), so a data set is paid for once, not at every command; an image
    that changes is decoded again. Without a writable ``record_dir`` nothing is kept.
    """
    stats = {p: os.stat(p) for p in paths}
    known: dict[str, str] = {}
    record = record_dir / DECODED_RECORD if record_dir is not None else None
    if record is not None and record.is_file():
        try:
            old = pd.read_csv(record, dtype={"path": str, "problem": str},
                              keep_default_na=False)
            for row in old.itertuples(index=False):
                st = stats.get(row.path)
                if st is not None and (st.st_size, st.st_mtime_ns) == (row.size,
                                                                       row.mtime_ns):
                    known[row.path] = row.problem
        except (OSError, ValueError, AttributeError, pd.errors.ParserError):
            known = {}
    todo = [p for p in paths if p not in known]
    if todo:
        if len(todo) > 500:
            log.info("decoding %d images once to check them (remembered in %s)", len(todo),
                     record or "memory only")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            known.update(zip(todo, (p or "" for p in pool.map(decode_problem, todo))))
        if record is not None and may_write():
            table = pd.DataFrame({"path": list(known),
                                  "size": [stats[p].st_size if p in stats
                                           else -1 for p in known],
                                  "mtime_ns": [stats[p].st_mtime_ns if p in stats
                                               else -1 for p in known],
                                  "problem": list(known.values())})
            try:
                record_dir.mkdir(parents=True, exist_ok=True)
                write_csv(record, table)
            except OSError:
                log.info("cannot remember decoded images in %s (not writable)", record_dir)
    return {p: known[p] for p in paths if known[p]}


def clean_table(df: pd.DataFrame, image_dir: Path, check_images: bool = True,
                strict: bool = False, source: str = "labels",
                age_range: tuple[float, float] | list[float] = AGE_RANGE,
                record_dir: Path | None = None) -> tuple[pd.DataFrame, CleaningReport]:
    """Drop rows that cannot be trained on, reporting each reason with counts and ids:
    ages that are missing, not numbers or not finite (``bad_label``), ages outside
    ``age_range`` months (``age_out_of_range``), unreadable sex, duplicate ids, missing
    or undecodable images (every image is decoded once; see :func:`verify_images`).

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

    male = df["male"].map(parse_sex)
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
        problems = verify_images(df["path"].tolist(), record_dir)
        ok = ~df["path"].isin(problems).to_numpy()
        report.unreadable_image = df.loc[~ok, "id"].tolist()
        for path in df.loc[~ok, "path"]:
            log.warning("skipping unreadable image %s (%s)", path, problems[path])
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
                 cache_dir: str | Path | None = None,
                 ) -> tuple[pd.DataFrame, CleaningReport, Path]:
    """Find, read and clean a data set; returns (table, report, data_dir). What was
    decoded is remembered in ``cache_dir`` (default ``data_dir/.boneage-cache``)."""
    root = resolve_data_dir(data_dir)
    layout = find_layout(root)
    df = read_labels(layout.labels_csv)
    table, report = clean_table(df, layout.image_dir, check_images=check_images,
                                strict=strict, source=str(layout.labels_csv),
                                age_range=age_range,
                                record_dir=cache_root(root, cache_dir))
    log.info("%s: %s", layout.labels_csv, report.summary())
    return table, report, root


def cache_root(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where a data folder's prepared caches and decode record go: ``cache_dir`` if
    given (``data.cache_dir``, ``--cache-dir``), else ``$BONEAGE_CACHE_DIR/<folder id>``
    when that variable is set (read-only data, shared machines), else
    ``DATA_DIR/.boneage-cache``."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
        return Path(env) / f"{Path(data_dir).resolve().name}-{key}"
    return Path(data_dir) / CACHE_DIRNAME


def age_bins(ages: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Quantile bins of bone age, for stratified splits."""
    edges = np.unique(np.quantile(ages, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.digitize(ages, edges)


CALIBRATION_MIN_IMAGES = 20   # fewer: no calibration split (calibration.MIN_IMAGES)


def age_balance_weights(ages: np.ndarray, power: float,
                        bin_months: float = AGE_BALANCE_BIN_MONTHS) -> np.ndarray:
    """Sample weights ``count(bin) ** -power`` over ``bin_months``-wide age bins of
    ``ages`` themselves, scaled to mean 1 (all ones for ``power`` 0): with 1, every bin
    weighs as much in the loss as any other, whatever its number of images."""
    ages = np.asarray(ages, dtype=np.float64)
    if power == 0 or not len(ages):
        return np.ones(len(ages), np.float32)
    bins = np.floor(ages / bin_months).astype(int)
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    weights = counts[inverse].astype(np.float64) ** -power
    return (weights / weights.mean()).astype(np.float32)


def split_table(df: pd.DataFrame, method: str = "random", val_fraction: float = 0.1,
                test_fraction: float = 0.0, seed: int = 42,
                calibration_fraction: float = 0.0) -> pd.DataFrame:
    """Add a ``split`` column (train/val/test/calibration), deterministic from ``seed``.

    ``stratified`` keeps the bone-age distribution (decile bins) equal across splits.
    The calibration split is cut only where it gets at least
    ``CALIBRATION_MIN_IMAGES`` images (a small run trains on them instead).
    """
    from sklearn.model_selection import train_test_split

    n = len(df)
    n_val = max(1, round(n * val_fraction))
    n_test = round(n * test_fraction) if test_fraction > 0 else 0
    n_cal = round(n * calibration_fraction)
    n_cal = n_cal if n_cal >= CALIBRATION_MIN_IMAGES else 0
    if n - n_val - n_test - n_cal < 1:
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
    if n_cal:
        rest, cal_idx = cut(rest, n_cal)
        split[cal_idx] = "calibration"
    _, val_idx = cut(rest, n_val)
    split[val_idx] = "val"
    return df.assign(split=split)


SELECTION_SEED = 1000   # fixed: every recipe and seed is compared on the same images


def set_selection(df: pd.DataFrame, size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the selection split, the rest): ``size`` images stratified by bone-age decile
    and sex, drawn with ``SELECTION_SEED`` from the whole table, so every recipe, seed
    and ``data.max_images`` of the same data is compared on the same images."""
    from sklearn.model_selection import train_test_split

    if size * 2 > len(df):
        raise DataError(f"config key 'data.selection_size': {size} of {len(df)} usable "
                        "images would leave fewer for training than for selection; "
                        "lower it (or 0 for no selection split).")
    strata = age_bins(df["boneage"].to_numpy()) * 2 + df["male"].astype(int).to_numpy()
    counts = np.bincount(strata)
    strat = strata if counts[counts > 0].min() >= 2 else None
    rest, chosen = train_test_split(np.arange(len(df)), test_size=size,
                                    random_state=SELECTION_SEED, stratify=strat)
    selection = df.iloc[np.sort(chosen)].assign(split="selection")
    return selection, df.iloc[np.sort(rest)].reset_index(drop=True)


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
