"""Radiographs as hospitals store them: DICOM files written from the real sample
radiographs give the same predictions as the PNGs they came from; the header's sex and
age feed predict; inverted PNGs are caught; mixed folders say what they skipped."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from conftest import cli_here, run_cli
from PIL import Image

from boneage_keras.dicom import (
    DicomError,
    parse_age,
    read_dicom_header,
    read_dicom_pixels,
)
from boneage_keras.images import looks_inverted, read_gray

IDS = ("1437", "1440", "1472", "1516")
NAME, PATIENT_ID = "Doe^Jane", "MRN-0042-SECRET"


def write_dicom(path, stored, bits, photometric="MONOCHROME2", slope=None, intercept=None,
                window=None, syntax=None, sex=None, age=None, dates=None, frames=1,
                pixels=True):
    """A DX DICOM file of ``stored`` (2-D unsigned ints), with a patient name and ID
    that must never be printed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dx
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = dx, uid, "DX"
    ds.PatientName, ds.PatientID = NAME, PATIENT_ID
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = age
    if dates is not None:
        ds.PatientBirthDate, ds.StudyDate = dates
    if pixels:
        data = np.repeat(stored[None], frames, axis=0) if frames > 1 else stored
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = data.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if syntax is not None:
            ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def scans(sample_dir, tmp_path_factory):
    """Real radiographs at 25% size as PNG, and DICOM variants of each."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    root = tmp_path_factory.mktemp("dicom")
    out = {"png": [], "m2_16bit": [], "m1_12bit_rescale": [], "m1_12bit_window": [],
           "rle": [], "jpeg2000": []}
    for image_id in IDS:
        gray = np.asarray(Image.open(sample_dir / "images" / f"{image_id}.png")
                          .convert("L").resize((400, 520), Image.BILINEAR))
        out["png"].append(root / f"{image_id}.png")
        Image.fromarray(gray).save(out["png"][-1])
        v = gray.astype(np.int64)
        out["m2_16bit"].append(write_dicom(root / f"{image_id}-m2.dcm", v * 257, 16))
        inverted = (255 - v) * 16                        # MONOCHROME1: bone dark
        stored = (inverted + 1000) // 2                  # modality: 2 * stored - 1000
        out["m1_12bit_rescale"].append(write_dicom(
            root / f"{image_id}-m1.dcm", stored, 12, "MONOCHROME1", 2, -1000))
        out["m1_12bit_window"].append(write_dicom(
            root / f"{image_id}-m1w.dcm", stored, 12, "MONOCHROME1", 2, -1000,
            window=(2040, 4081)))
        out["rle"].append(write_dicom(root / f"{image_id}-rle.dcm", v * 257, 16,
                                      syntax=RLELossless))
        out["jpeg2000"].append(write_dicom(root / f"{image_id}-j2k.dcm", v * 16, 12,
                                           syntax=JPEG2000Lossless))
    return root, out


def test_dicom_pixels_match_the_png(scans):
    _, out = scans
    for k, png in enumerate(out["png"]):
        reference = read_gray(png).astype(int)
        for kind in ("m2_16bit", "m1_12bit_rescale", "m1_12bit_window", "rle", "jpeg2000"):
            pixels = read_dicom_pixels(out[kind][k]).astype(int)
            assert pixels.shape == reference.shape
            assert np.abs(pixels - reference).max() <= 2, kind     # rounding only
            assert np.abs(pixels - reference).mean() < 1, kind


def test_dicom_predictions_match_the_png(scans, trained_run):
    _, out = scans
    kinds = ("png", "m2_16bit", "m1_12bit_rescale", "m1_12bit_window", "rle", "jpeg2000")
    files = [str(p) for kind in kinds for p in out[kind]]
    proc = cli_here(["predict", "--model", trained_run / "best.keras", *files])
    table = pd.read_csv(io.StringIO(proc.stdout))
    predicted = table["predicted"].to_numpy().reshape(len(kinds), len(IDS))
    for row, kind in zip(predicted[1:], kinds[1:]):
        np.testing.assert_allclose(row, predicted[0], atol=0.5, err_msg=kind)
    assert np.ptp(predicted[0]) > 0.5          # different radiographs, different ages
    assert NAME not in proc.stdout + proc.stderr and PATIENT_ID not in proc.stdout


def test_unusable_dicom_files_get_clear_errors(tmp_path, sample_dir):
    gray = np.asarray(Image.open(sample_dir / "images" / "1437.png").convert("L")
                      .resize((100, 130)))
    multi = write_dicom(tmp_path / "multi.dcm", gray.astype(int) * 257, 16, frames=3)
    with pytest.raises(DicomError, match="multi-frame DICOM \\(3 frames\\)"):
        read_dicom_pixels(multi)
    report = write_dicom(tmp_path / "sr.dcm", None, 16, pixels=False)
    with pytest.raises(DicomError, match="without pixel data.*not a radiograph"):
        read_dicom_pixels(report)
    (tmp_path / "junk.dcm").write_text("a report saved with the wrong extension")
    with pytest.raises(DicomError, match="junk.dcm: not a readable DICOM file"):
        read_dicom_pixels(tmp_path / "junk.dcm")


def test_missing_decoder_names_the_package_to_install(tmp_path, trained_run):
    """A JPEG Lossless (process 14) file on a machine without pylibjpeg's libjpeg
    plugin or gdcm (nothing else decodes it): the error names what to install."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    scan = write_dicom(tmp_path / "lossless.dcm", np.zeros((8, 8), int), 12)
    ds = pydicom.dcmread(scan)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(scan)
    proc = run_cli(["predict", "--model", str(trained_run / "best.keras"), str(scan)],
                   hide=("libjpeg", "pylibjpeg", "gdcm"), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)" in proc.stdout
    assert NAME not in proc.stdout + proc.stderr


def test_header_fields():
    assert parse_age("010Y") == 120 and parse_age("006M") == 6
    assert parse_age("014W") == pytest.approx(14 * 7 / 30.4375)
    assert parse_age("") is None and parse_age("10 years") is None


@pytest.fixture(scope="module")
def sex_model(bulk_dir, tmp_path_factory):
    """A small model with the sex input, trained briefly on real images; its sex
    branch then set to weigh clearly (one epoch may leave the sex input's effect
    under the 0.01 months a test can tell apart)."""
    from boneage_keras.config import load_config
    from boneage_keras.model import load_model
    from boneage_keras.train import train

    out = tmp_path_factory.mktemp("sexrun")
    cfg = load_config("default", [
        f"data.data_dir={bulk_dir}", "data.max_images=400", "data.image_size=32",
        "data.resize=stretch", "model.backbone=resnet18", "model.weights=none",
        "model.use_sex=true", "train.epochs=1", "train.batch_size=32",
        "train.learning_rate=0.003", f"train.output_dir={out}", "train.run_name=sex"])
    model = load_model(str(train(cfg, verbose=0).run_dir / "best.keras"))
    sex = model.get_layer("sex_dense")
    kernel, bias = sex.get_weights()
    sex.set_weights([np.full_like(kernel, 5.0), np.zeros_like(bias)])
    model.save(out / "sex.keras")
    return out / "sex.keras"


def test_the_header_feeds_the_model(scans, sex_model, tmp_path):
    _, out = scans
    gray = np.asarray(Image.open(out["png"][0]))
    boy = write_dicom(tmp_path / "boy.dcm", gray.astype(int) * 257, 16, sex="M",
                      age="010Y")
    girl = write_dicom(tmp_path / "girl.dcm", gray.astype(int) * 257, 16, sex="F",
                       dates=("20100315", "20200915"))
    unknown = write_dicom(tmp_path / "unknown.dcm", gray.astype(int) * 257, 16, sex="O")
    header = read_dicom_header(girl)
    assert header.sex_text == "F" and header.chronological_age == pytest.approx(126, abs=0.5)
    proc = cli_here(["predict", "--model", sex_model, boy, girl])
    table = pd.read_csv(io.StringIO(proc.stdout))
    assert table["male"].tolist() == [True, False]
    assert table["chronological_age"].tolist() == pytest.approx([120.0, 126.06], abs=0.01)
    np.testing.assert_allclose(table["difference"], table["predicted"]
                               - table["chronological_age"], atol=0.02)
    assert table["predicted"].iloc[0] != pytest.approx(table["predicted"].iloc[1],
                                                       abs=0.01)   # same pixels
    # --sex that contradicts the header: an error, unless overridden
    proc = cli_here(["predict", "--model", sex_model, "--sex", "F", boy], check=False)
    assert proc.returncode == 2 and "contradicts the DICOM header's PatientSex (M)" in \
        proc.stderr and NAME not in proc.stderr and PATIENT_ID not in proc.stderr
    proc = cli_here(["predict", "--model", sex_model, "--sex", "F", "--sex-override", boy])
    assert pd.read_csv(io.StringIO(proc.stdout))["male"].tolist() == [False]
    # O (or no sex) for a sex model: the usual clear error
    proc = cli_here(["predict", "--model", sex_model, unknown], check=False)
    assert proc.returncode == 2 and "needs the patient's sex" in proc.stderr
    # ids: the file name, or the SOPInstanceUID on request; a PNG's age from the flag
    proc = cli_here(["predict", "--model", sex_model, "--id-from", "sop",
                     "--chronological-age", "100", "--sex", "M", boy, out["png"][0]])
    table = pd.read_csv(io.StringIO(proc.stdout), dtype={"id": str})
    assert table["id"].tolist() == [read_dicom_header(boy).sop_instance_uid, IDS[0]]
    assert table["chronological_age"].tolist() == [120.0, 100.0]


def test_a_mixed_folder_says_what_it_skipped(scans, trained_run, tmp_path):
    _, out = scans
    folder = tmp_path / "pacs" / "STUDY1"
    folder.mkdir(parents=True)
    (folder / "a.png").symlink_to(out["png"][0])
    (folder / "IM0001").symlink_to(out["m2_16bit"][1])      # DICOM without extension
    (folder / "notes.txt").write_text("hello")
    write_dicom(folder.parent / "DICOMDIR", None, 16, pixels=False)
    proc = cli_here(["predict", "--model", trained_run / "best.keras", tmp_path / "pacs"])
    table = pd.read_csv(io.StringIO(proc.stdout), dtype={"id": str})
    assert table["id"].tolist() == ["IM0001", "a"]          # sorted by path
    assert "skipped 2 file(s)" in proc.stderr
    assert "STUDY1/notes.txt (not PNG, JPEG or DICOM (.txt))" in proc.stderr
    assert "DICOMDIR (a DICOMDIR index, not an image)" in proc.stderr


def test_inverted_images_are_caught_and_reported(sample_dir, bulk_dir, trained_run,
                                                 tmp_path):
    """Measured on real images: every full-size radiograph passes and every inverted
    copy is caught; on 600 of the 100 px scans, at most 1% either way
    (experiments/2026-11-26-inversion-detector.md)."""
    full = sorted((sample_dir / "images").glob("*.png"))
    bulk = sorted((bulk_dir / "images").glob("*.png"))[::20]
    for paths, limit in ((full, 0), (bulk, 6)):
        grays = [read_gray(p, fix_inverted=False) for p in paths]
        assert sum(looks_inverted(g) for g in grays) <= limit
        assert sum(not looks_inverted(255 - g) for g in grays) <= limit
    negative = tmp_path / "negative.png"
    Image.fromarray(255 - read_gray(full[0], fix_inverted=False)).save(negative)
    proc = cli_here(["predict", "--model", trained_run / "best.keras", full[0], negative])
    table = pd.read_csv(io.StringIO(proc.stdout), keep_default_na=False)
    note = "looked inverted (bright background, dark bones): inverted back"
    assert table["warnings"].tolist() == ["", note]
    assert table["predicted"].iloc[0] == pytest.approx(table["predicted"].iloc[1], abs=0.01)
    # evaluate counts them
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "1437.png").symlink_to(negative)
    (data / "labels.csv").write_text("id,boneage,male\n1437,100,True\n")
    proc = cli_here(["evaluate", "--model", trained_run / "best.keras", "--data-dir", data,
                     "--out", tmp_path / "eval"])
    assert "1 image(s) looked inverted" in proc.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())[
        "inverted_images"] == 1


def test_a_data_folder_of_dicom_files_trains_like_pngs(scans, tmp_path, monkeypatch):
    """Labels that name .dcm files: cleaning finds and decodes them, and `prepare`
    caches the same pixels as from the PNGs."""
    from boneage_keras.cache import find_cache, prepare_cache
    from boneage_keras.data import load_dataset

    _, out = scans
    for kind, suffix in (("png", ".png"), ("m1_12bit_rescale", ".dcm")):
        data = tmp_path / kind
        (data / "images").mkdir(parents=True)
        for image_id, source in zip(IDS, out[kind]):
            (data / "images" / f"{image_id}{suffix}").symlink_to(source)
        (data / "labels.csv").write_text("id,boneage,male\n" + "".join(
            f"{i},{100 + k},True\n" for k, i in enumerate(IDS)))
        table, report, _ = load_dataset(data)
        assert report.rows_kept == 4 and table["path"].str.endswith(suffix).all()
        prepare_cache(data, 64, cache_dir=tmp_path / f"cache-{kind}", progress=False)
    caches = [find_cache(load_dataset(tmp_path / kind)[0], tmp_path / kind, 64, "pad",
                         tmp_path / f"cache-{kind}") for kind in ("png", "m1_12bit_rescale")]
    assert np.abs(caches[0].images.astype(int) - caches[1].images.astype(int)).max() <= 2
