from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_flat_dataset

from boneage_keras import data
from boneage_keras.data import (
    DataError,
    age_balance_weights,
    clean_table,
    find_layout,
    load_dataset,
    split_table,
)


def test_kaggle_layouts_and_flat(tmp_path):
    flat = write_flat_dataset(tmp_path / "flat", [("1", 10, True)])
    assert find_layout(flat).image_dir == flat / "images"
    for nested in (False, True):
        root = tmp_path / f"kaggle{nested}"
        folder = root / "boneage-training-dataset"
        if nested:
            folder = folder / "boneage-training-dataset"
        folder.mkdir(parents=True)
        (root / "boneage-training-dataset.csv").write_text("id,boneage,male\n")
        assert find_layout(root).image_dir == folder
    with pytest.raises(DataError, match="labels.csv"):
        find_layout(tmp_path / "flat" / "images")


def test_cleaning_reports_every_reason(tmp_path):
    root = write_flat_dataset(tmp_path, [("1", 100, True), ("2", -5, False), ("3", "x", True),
                                         ("4", 50, "maybe"), ("5", 60, False),
                                         ("6", 70, "F"), ("7", 80, "M")])
    with open(root / "labels.csv", "a") as f:
        f.write("5,61,False\n8,90,True\n")          # duplicate id 5; id 8 has no image
    (root / "images" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # corrupt
    table, report = clean_table(data.read_labels(root / "labels.csv"), root / "images")
    assert report.rows_read == 9
    assert report.bad_label == ["3"] and report.age_out_of_range == ["2"]
    assert report.bad_sex == ["4"]
    assert report.duplicate_id == ["5"] and report.missing_image == ["8"]
    assert report.unreadable_image == ["7"]
    assert table["id"].tolist() == ["1", "5", "6"] and report.rows_kept == 3
    assert table["male"].tolist() == [True, False, False]
    assert "1 dropped for unreadable image (7)" in report.summary()
    with pytest.raises(DataError, match="strict mode and 6 row"):
        clean_table(data.read_labels(root / "labels.csv"), root / "images", strict=True)


def test_ages_must_be_finite_and_in_range(sample_dir, tmp_path):
    rows = [("1437", "inf", True), ("1440", "1e9", False), ("1472", "nan", True),
            ("1516", "240.5", True), ("1541", "-0.5", False), ("1578", "12", "F")]
    (tmp_path / "images").mkdir()
    for image_id, _, _ in rows:
        (tmp_path / "images" / f"{image_id}.png").symlink_to(
            sample_dir / "images" / f"{image_id}.png")
    (tmp_path / "labels.csv").write_text("id,boneage,male\n" + "".join(
        f"{i},{a},{m}\n" for i, a, m in rows))
    table, report, _ = load_dataset(tmp_path)
    assert report.bad_label == ["1437", "1472"]
    assert report.age_out_of_range == ["1440", "1516", "1541"]
    assert table["id"].tolist() == ["1578"]
    assert "3 dropped for age out of range (1440, 1516, 1541)" in report.summary()
    # the range is a config value
    table, report, _ = load_dataset(tmp_path, age_range=(0, 300))
    assert sorted(table["id"]) == ["1516", "1578"]


def test_cleaning_decodes_every_image_once(sample_dir, tmp_path, monkeypatch):
    """A truncated JPEG has a valid header (PIL's verify() passes it): cleaning decodes
    every image fully, and remembers what it decoded so the cost is paid once."""
    from PIL import Image

    monkeypatch.delenv("BONEAGE_CACHE_DIR")
    (tmp_path / "images").mkdir()
    ids = ["1437", "1440", "1472"]
    for image_id in ids:
        Image.open(sample_dir / "images" / f"{image_id}.png").save(
            tmp_path / "images" / f"{image_id}.jpg", quality=90)
    broken = tmp_path / "images" / "1440.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with Image.open(broken) as im:
        im.verify()                                  # the header check alone passes
    (tmp_path / "labels.csv").write_text("id,boneage,male\n1437,100,True\n"
                                         "1440,120,False\n1472,90,True\n")
    decoded = []
    real = data.decode_problem
    monkeypatch.setattr(data, "decode_problem", lambda p: decoded.append(p) or real(p))
    table, report, _ = load_dataset(tmp_path)
    assert report.unreadable_image == ["1440"] and len(decoded) == 3
    assert (tmp_path / ".boneage-cache" / "decoded.csv").is_file()
    decoded.clear()
    table, report, _ = load_dataset(tmp_path)          # remembered: nothing decoded
    assert report.unreadable_image == ["1440"] and decoded == []
    Image.open(sample_dir / "images" / "1440.png").save(broken)   # repaired
    table, report, _ = load_dataset(tmp_path)
    assert decoded == [str(broken.resolve())] and len(table) == 3


def test_missing_columns_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels.csv").write_text("id,age\n1,3\n")
    with pytest.raises(DataError, match="missing column.*boneage, male"):
        load_dataset(tmp_path)


def test_no_data_dir_offline_says_how_to_get_data(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BONEAGE_DATA_DIR", raising=False)
    import kagglehub

    def offline(handle):
        raise ConnectionError("no network")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(DataError) as err:
        data.resolve_data_dir(None)
    assert "kmader/rsna-bone-age" in str(err.value) and "--data-dir" in str(err.value)


def test_real_sample_loads(sample_dir):
    table, report, _ = load_dataset(sample_dir)
    assert report.rows_kept == 60 and len(table) == 60
    assert table["boneage"].between(1, 240).all()
    assert all(Path(p).is_file() for p in table["path"])


def test_lossless_webp_reads_as_the_png(bulk_dir, tmp_path):
    """WebP (what scripts/pack-webp.py carries to a GPU machine) is found and decoded
    to the PNG's own pixels."""
    from PIL import Image

    from boneage_keras.images import read_gray

    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str}).head(5)
    (tmp_path / "images").mkdir()
    labels.to_csv(tmp_path / "labels.csv", index=False)
    for image_id in labels["id"]:
        Image.open(bulk_dir / "images" / f"{image_id}.png").save(
            tmp_path / "images" / f"{image_id}.webp", lossless=True)
    table, report, _ = load_dataset(tmp_path)
    assert report.rows_kept == 5
    for path, image_id in zip(table["path"], table["id"]):
        assert path.endswith(".webp")
        png = read_gray(bulk_dir / "images" / f"{image_id}.png")
        assert np.array_equal(read_gray(path), png)


def test_splits_are_deterministic_and_stratified(bulk_dir):
    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})
    a = split_table(labels, "stratified", 0.1, 0.1, seed=3)
    b = split_table(labels, "stratified", 0.1, 0.1, seed=3)
    c = split_table(labels, "stratified", 0.1, 0.1, seed=4)
    assert a["split"].tolist() == b["split"].tolist() != c["split"].tolist()
    counts = a["split"].value_counts()
    assert abs(counts["val"] - 1211) <= 1 and abs(counts["test"] - 1211) <= 1
    # stratified: every age decile gives val and test its share (10%) to within two
    # images; a random split of the same size misses by far more in some decile
    bins = data.age_bins(labels["boneage"].to_numpy())

    def worst_miss(split, name):
        counts = pd.crosstab(bins, split["split"])
        return float((counts[name] - 0.1 * counts.sum(axis=1)).abs().max())

    assert worst_miss(a, "val") <= 2 and worst_miss(a, "test") <= 2
    r = split_table(labels, "random", 0.1, 0.1, seed=3)
    assert worst_miss(r, "val") > 5
    r = split_table(labels, "random", 0.1, seed=3)
    assert set(r["split"]) == {"train", "val"} and abs((r["split"] == "val").sum() - 1211) <= 1


def test_the_calibration_split_is_its_own_stratified_share(bulk_dir):
    """The calibration split (fits a run's correction and interval) is cut after the
    test split, which stays the same, and apart from training and validation; a table
    too small for 20 calibration images trains on them instead."""
    from boneage_keras.config import ConfigError, load_config

    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})
    a = split_table(labels, "stratified", 0.1, 0.1, seed=3, calibration_fraction=0.05)
    plain = split_table(labels, "stratified", 0.1, 0.1, seed=3)
    counts = a["split"].value_counts()
    assert abs(counts["calibration"] - 606) <= 1 and abs(counts["val"] - 1211) <= 1
    assert (a["split"] == "test").tolist() == (plain["split"] == "test").tolist()
    bins = data.age_bins(labels["boneage"].to_numpy())
    share = pd.crosstab(bins, a["split"])
    assert float((share["calibration"] - 0.05 * share.sum(axis=1)).abs().max()) <= 2
    small = split_table(labels.head(300), "stratified", 0.1, 0.0, seed=3,
                        calibration_fraction=0.05)
    assert set(small["split"]) == {"train", "val"}
    with pytest.raises(ConfigError, match="data.calibration_fraction"):
        load_config("cpu-bench", ["data.calibration_fraction=0.5"])


def test_the_selection_split_is_one_fixed_stratified_set_apart_from_training(bulk_dir):
    """Every recipe, seed and max_images of the same data is scored on the same 1,000
    images, each age decile and sex at its share, none of them trained on."""
    from boneage_keras.config import load_config
    from boneage_keras.rundir import make_split

    labels = pd.read_csv(bulk_dir / "labels.csv", dtype={"id": str})
    splits = [make_split(load_config("cpu-bench", [
        f"data.data_dir={bulk_dir}", "data.selection_size=1000", *extra]))
        for extra in ([], ["train.seed=7", "data.max_images=500"])]
    chosen = [set(s.loc[s["split"] == "selection", "id"]) for s in splits]
    assert len(chosen[0]) == 1000 and chosen[0] == chosen[1]
    for split in splits:
        fitted = set(split.loc[split["split"].isin(["train", "val", "calibration"]), "id"])
        assert fitted and not fitted & chosen[0]
    assert (splits[1]["split"] != "selection").sum() == 500
    # every age-decile x sex stratum holds its share of the 1,000 to within two images;
    # a random draw of the same size misses by more
    strata = pd.Series(data.age_bins(labels["boneage"].to_numpy()) * 2
                       + labels["male"].astype(int).to_numpy(), index=labels["id"])

    def worst_miss(ids):
        share = strata.value_counts() * 1000 / len(strata)
        return float((strata[list(ids)].value_counts() - share).abs().max())

    assert worst_miss(chosen[0]) <= 2
    assert worst_miss(labels["id"].sample(1000, random_state=0)) > 4
    too_big = load_config("cpu-bench", [f"data.data_dir={bulk_dir}",
                                        "data.selection_size=7000"])
    with pytest.raises(data.DataError, match="data.selection_size"):
        make_split(too_big)


def test_age_groups():
    groups = data.assign_age_group(np.array([0, 60, 60.5, 61, 120, 121, 180, 181, 240, 250]))
    assert groups.tolist() == ["0-60", "0-60", "61-120", "61-120", "61-120", "121-180",
                               "121-180", "181-240", "181-240", "181-240"]


def test_age_balance_weights_soften_with_the_power():
    ages = np.array([3.0] * 4 + [150.0, 155.0] * 8)     # 4 in one 12-month bin, 16 in another
    np.testing.assert_array_equal(age_balance_weights(ages, 0.0), 1.0)
    half = age_balance_weights(ages, 0.5)
    assert half.mean() == pytest.approx(1.0)
    assert half[0] / half[-1] == pytest.approx(2.0)      # sqrt(16 / 4)
