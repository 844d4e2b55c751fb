"""Radiographs as hospitals store them: DICOM pixels and the header fields we use.

    >>> pixels = read_dicom_pixels("scan.dcm")    # 2-D uint8, bone bright
    >>> header = read_dicom_header("scan.dcm")    # sex, chronological age, SOP UID

Pixels go through the modality LUT (RescaleSlope / RescaleIntercept), then the VOI LUT
or the first window (WindowCenter / WindowWidth) when the file has one, else the range
of the stored values present (lowest to highest, as a viewer's automatic window), to
0-255; MONOCHROME1 (bone dark) is inverted so that bone
is bright as in the training data. 8-16 bits stored; compressed transfer syntaxes
(JPEG lossless, JPEG 2000, RLE) decode through pydicom's pixel-data handlers where their
packages are installed, and an error names the package where not. Multi-frame files
and files without pixel data (a structured report, say) are refused with a clear
error. Nothing here puts a patient's name or identifiers in a message: files are named
by their path only.
"""

from __future__ import annotations

import datetime
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import BoneAgeError

DICOM_SUFFIXES = (".dcm", ".dicom")
HANDLER_PACKAGES = {
    "HTJ2K": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "RLE": "pylibjpeg pylibjpeg-rle (or python-gdcm)",
    "JPEG-LS": "pyjpegls (or python-gdcm)",
}


class DicomError(BoneAgeError, ValueError):
    """A DICOM file cannot be used as a hand radiograph; the message says why."""


class DicomTooLarge(DicomError):
    """A DICOM image with more pixels than the caller accepts."""


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble's "DICM" marker."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DicomError("reading DICOM files needs pydicom: pip install pydicom "
                         "(or pip install \"boneage-keras[dicom]\").") from None
    return pydicom


def _read(path: str | Path | BinaryIO, pixels: bool, name: str | None = None):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path if hasattr(path, "read") else str(path),
                               stop_before_pixels=not pixels)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise DicomError(f"{name or path}: not a readable DICOM file ({type(err).__name__}: "
                         f"{str(err)[:200]}).") from None


def _handler_hint(syntax_name: str) -> str:
    for key in ("HTJ2K", "JPEG 2000", "JPEG-LS", "RLE", "JPEG"):
        if key.replace(" ", "").lower() in syntax_name.replace(" ", "").lower():
            return HANDLER_PACKAGES[key]
    return "pylibjpeg with its plugins, or python-gdcm"


def read_dicom_pixels(path: str | Path) -> np.ndarray:
    """The radiograph of a DICOM file as a 2-D uint8 array, bone bright."""
    return _pixels(_read(path, pixels=True), path)


def read_dicom_bytes(data: bytes, name: str, max_pixels: int | None = None
                     ) -> tuple[np.ndarray, DicomHeader]:
    """The radiograph (2-D uint8, bone bright) and header of a DICOM file held in
    memory (an upload), named ``name`` in messages; more than ``max_pixels`` pixels
    raise :class:`DicomTooLarge` before any are decoded."""
    ds = _read(io.BytesIO(data), pixels=True, name=name)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if max_pixels is not None and rows * cols > max_pixels:
        raise DicomTooLarge(f"{name}: {cols} x {rows} pixels is more than "
                            f"{max_pixels / 1e6:g} megapixels; send a smaller image.")
    return _pixels(ds, name), _header(ds)


def _pixels(ds, path: str | Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        kind = getattr(getattr(ds, "SOPClassUID", None), "name", "unknown kind")
        raise DicomError(f"{path}: a DICOM file without pixel data ({kind}), not a "
                         "radiograph; give the image files of the study.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"{path}: a multi-frame DICOM ({frames} frames); give one "
                         "radiograph per file.")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(f"{path}: a colour DICOM ({ds.get('PhotometricInterpretation')}); "
                         "hand radiographs are grayscale (MONOCHROME1/2).")
    try:
        stored = ds.pixel_array
    except Exception as err:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"{path}: its pixel data ({name}) cannot be decoded here: "
                         f"pip install {_handler_hint(name)}.") from err
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(_first(ds.WindowCenter))
        width = max(float(_first(ds.WindowWidth)), 1.0)
        # DICOM PS3.3 C.11.2.1.2.1, linear: the window's range to 0..1
        scaled = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0) \
            if width > 1 else (values > center - 0.5).astype(np.float64)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _first(value):
    try:
        return value[0]
    except TypeError:
        return value


@dataclass
class DicomHeader:
    """What the header says that bone-age assessment uses (never names or IDs)."""

    sex_text: str                    # PatientSex as written (M, F, O or empty)
    chronological_age: float | None  # months at the study
    sop_instance_uid: str | None
    age_source: str | None = None    # PatientAge, or StudyDate - PatientBirthDate


def parse_age(text: str) -> float | None:
    """A DICOM Age String (``010Y``, ``006M``, ``120D``, ``012W``) in months."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(text or "").upper())
    if not match:
        return None
    n, unit = int(match.group(1)), match.group(2)
    return {"Y": 12.0 * n, "M": float(n), "W": n * 7 / 30.4375, "D": n / 30.4375}[unit]


def _date(text: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(text).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def months_between(birth: datetime.date, study: datetime.date) -> float:
    return (study - birth).days / 30.4375


def read_dicom_header(path: str | Path) -> DicomHeader:
    """Sex, chronological age (PatientAge, else StudyDate - PatientBirthDate, in
    months) and SOPInstanceUID of a DICOM file, without reading its pixels."""
    return _header(_read(path, pixels=False))


def _header(ds) -> DicomHeader:
    sex_text = str(ds.get("PatientSex", "") or "").strip().upper()
    age = parse_age(ds.get("PatientAge", ""))
    source = "PatientAge" if age is not None else None
    if age is None:
        birth, study = _date(ds.get("PatientBirthDate", "")), _date(ds.get("StudyDate", ""))
        if birth and study and study >= birth:
            age, source = months_between(birth, study), "StudyDate - PatientBirthDate"
    uid = ds.get("SOPInstanceUID")
    return DicomHeader(sex_text, age, str(uid) if uid else None, source)
