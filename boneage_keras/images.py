"""Decode radiographs to one gray uint8 channel at a fixed square size.

This is the model-independent part of preprocessing, shared by every loader and by
``predict``; normalisation for the backbone lives inside the model (see model.py).
PNG and JPEG (8/16-bit, gray/RGB/palette) through PIL, DICOM through ``dicom.py``.
A PNG/JPEG that looks inverted (bright background, dark bones) is inverted back and
noted (:func:`looks_inverted`).

    >>> arr = load_image("1437.png", image_size=224, geometry="pad")   # (224, 224, 1) uint8
    >>> notes = {}; load_image("scan.png", 224, notes=notes)    # notes[path]: warnings
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BoneAgeError

CROP_FRACTION = 0.875


class ImageError(BoneAgeError, ValueError):
    """An image cannot be decoded; the message names the file."""


def to_gray_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image (8/16-bit, gray, RGB(A), palette) -> 2-D uint8 array.

    16-bit and 32-bit images are stretched from their own min..max to 0..255, since
    their stored range (10, 12 or 16 bits) varies between scanners.
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        low, high = float(arr.min()), float(arr.max())
        if high <= low:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.round((arr - low) * (255.0 / (high - low))).astype(np.uint8)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def pad_to_square(arr: np.ndarray) -> np.ndarray:
    """Centre a 2-D image on a black square canvas (radiograph background is black)."""
    h, w = arr.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=arr.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = arr
    return out


HAND_MARGIN = 0.05


def crop_to_hand(arr: np.ndarray, margin: float = HAND_MARGIN) -> np.ndarray:
    """The hand's bounding box (plus ``margin`` of each side): Otsu's threshold on a
    downscaled copy, the largest connected bright region, its box scaled back. An image
    where no region covers 5% of it is returned whole."""
    from scipy import ndimage

    h, w = arr.shape
    step = max(1, max(h, w) // 256)
    small = arr[::step, ::step].astype(np.float64)
    hist = np.bincount(small.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    weight0, mean_all = np.cumsum(hist), np.cumsum(hist * levels)
    total = weight0[-1]
    between = (mean_all[-1] * weight0 - mean_all * total) ** 2 / np.maximum(
        weight0 * (total - weight0), 1e-9)
    labels, count = ndimage.label(small > np.argmax(between), structure=np.ones((3, 3)))
    if count == 0:
        return arr
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < 0.05 * small.size:
        return arr
    rows, cols = np.nonzero(labels == largest)
    top, bottom = rows.min() * step, (rows.max() + 1) * step
    left, right = cols.min() * step, (cols.max() + 1) * step
    dy, dx = round(margin * (bottom - top)), round(margin * (right - left))
    return arr[max(0, top - dy):min(h, bottom + dy), max(0, left - dx):min(w, right + dx)]


# How an image becomes a square: the resize (``data.resize``: pad or stretch), after a
# crop to the hand with ``data.crop_hand`` (``hand+pad``, ``hand+stretch``). Readers,
# caches and the model's preprocessing record this one string.
GEOMETRIES = ("pad", "stretch", "hand+pad", "hand+stretch")


def geometry_name(resize: str, crop_hand: bool) -> str:
    """The geometry string of ``resize`` (pad or stretch) with or without the hand crop."""
    return f"hand+{resize}" if crop_hand else resize


def resize_gray(arr: np.ndarray, size: int, geometry: str = "pad") -> np.ndarray:
    """2-D uint8 -> (size, size) uint8: ``pad`` to a black square or ``stretch``; the
    ``hand+`` forms first crop to the hand (:func:`crop_to_hand`)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got "
                         f"{geometry!r}")
    resize = geometry
    if geometry.startswith("hand+"):
        arr = crop_to_hand(arr)
        resize = geometry.removeprefix("hand+")
    if resize == "pad":
        arr = pad_to_square(arr)
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))


# Logistic regression on inversion_features, fitted on the real sample by
# scripts/fit_inversion_detector.py (real images vs their inverted copies). Measured
# there, cross-validated: experiments/2026-11-26-inversion-detector.md.
INVERSION_WEIGHTS = (-1.0776, 4.1416, -8.4475, 2.8879, 6.4847, 55.9467, -3.554, -4.5594,
                     -23.2039, -0.5108)
INVERSION_BIAS = -18.0545
INVERTED_NOTE = "looked inverted (bright background, dark bones): inverted back"


def _small_square(gray: np.ndarray, size: int) -> np.ndarray:
    """``resize_gray(gray, size, "pad")`` for the inversion check, fast on a full-size
    radiograph: first box-reduced (PIL's ``reduce``) to at least twice ``size``, then
    padded and resized: a third of the cost, and on the sample's radiographs and their
    negatives no decision changed (experiments/2026-11-26-inversion-detector.md)."""
    factor = max(gray.shape) // (2 * size)
    if factor >= 2:
        gray = np.asarray(Image.fromarray(gray).reduce(factor))
    return resize_gray(gray, size, "pad")


def inversion_features(gray: np.ndarray) -> np.ndarray:
    """What tells a radiograph from its negative: bones are thin structures brighter
    than their surroundings (skew of the fine detail at three scales, in the centre),
    and the background is dark (border and centre brightness, percentiles)."""
    from scipy import ndimage

    x = _small_square(gray, 128).astype(np.float64) / 255.0
    h = x.shape[0]
    centre = x[int(h * 0.2):int(h * 0.8), int(h * 0.2):int(h * 0.8)]
    b = max(1, round(0.06 * h))
    border = np.concatenate([x[:b].ravel(), x[-b:].ravel(), x[:, :b].ravel(),
                             x[:, -b:].ravel()])

    def skew(values: np.ndarray) -> float:
        """scipy.stats.skew (biased), without importing scipy.stats (slow to load)."""
        if np.ptp(values) <= 0:
            return 0.0
        d = values.ravel() - values.mean()
        return float(np.mean(d ** 3) / np.mean(d ** 2) ** 1.5)

    detail = [skew(centre - ndimage.gaussian_filter(centre, s)) for s in (1.5, 3, 6)]
    return np.array([*detail, skew(centre), float(np.median(border)),
                     float(np.median(x)), float(np.median(centre)),
                     float(np.percentile(centre, 99)), float(np.percentile(centre, 1)),
                     float(centre.mean() - np.median(border))])


def looks_inverted(gray: np.ndarray) -> bool:
    """Whether a 2-D uint8 radiograph shows bones dark on a bright background."""
    score = float(np.dot(INVERSION_WEIGHTS, inversion_features(gray)) + INVERSION_BIAS)
    return score > 0.0


def read_gray(path: str | Path, notes: dict[str, list[str]] | None = None,
              fix_inverted: bool = True) -> np.ndarray:
    """Decode an image file (PNG, JPEG or DICOM) to a 2-D uint8 array with bone
    bright, or raise ImageError naming it. A PNG/JPEG that looks inverted is inverted
    back (``fix_inverted``) and a note is added to ``notes[str(path)]``."""
    from .dicom import DicomError, is_dicom, read_dicom_pixels

    if is_dicom(path):
        try:
            return read_dicom_pixels(path)
        except DicomError as err:
            raise ImageError(str(err)) from None
    try:
        with Image.open(path) as image:
            image.load()
            gray = to_gray_uint8(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot decode image {path}: {err}") from None
    if fix_inverted and looks_inverted(gray):
        if notes is not None:
            notes.setdefault(str(path), []).append(INVERTED_NOTE)
        return 255 - gray
    return gray


# What an upload is, told from its first bytes (never from its name)
SIGNATURES = (("png", b"\x89PNG\r\n\x1a\n", 0), ("jpeg", b"\xff\xd8\xff", 0),
              ("webp", b"WEBP", 8), ("dicom", b"DICM", 128))
LOOKALIKES = ((b"%PDF", "a PDF document"), (b"GIF8", "a GIF image"),
              (b"PK\x03\x04", "a ZIP archive"), (b"II*\x00", "a TIFF image"),
              (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
              (b"\x1f\x8b", "a gzip archive"), (b"{", "JSON or text"),
              (b"<", "HTML, XML or SVG"))


class UnsupportedFormat(ImageError):
    """Bytes that are none of the formats an upload may have."""


class TooManyPixels(ImageError):
    """An image larger than the caller accepts."""


def sniff_format(data: bytes) -> str | None:
    """``png``, ``jpeg``, ``webp`` or ``dicom`` from the first bytes, else None."""
    for name, magic, offset in SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (name != "webp"
                                                          or data[:4] == b"RIFF"):
            return name
    return None


def describe_bytes(data: bytes) -> str:
    """What unsupported bytes look like, for the error message."""
    if not data:
        return "an empty body"
    for magic, what in LOOKALIKES:
        if data.startswith(magic):
            return what
    sample = data[:512]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return "plain text"
    return f"unknown binary data (first bytes {data[:8].hex(' ')})"


def gray_from_bytes(data: bytes, name: str, max_pixels: int | None = None,
                    notes: list[str] | None = None) -> tuple[np.ndarray, Any]:
    """An upload (PNG, JPEG, WebP or DICOM in memory) -> (2-D uint8 with bone bright,
    the DICOM header or None). Raises :class:`UnsupportedFormat` for other bytes,
    :class:`TooManyPixels` over ``max_pixels`` (checked before decoding) and
    :class:`ImageError` for a damaged image; an inverted PNG/JPEG/WebP is inverted
    back with a note in ``notes``."""
    kind = sniff_format(data)
    if kind is None:
        raise UnsupportedFormat(f"{name}: not a PNG, JPEG, WebP or DICOM file; it looks "
                                f"like {describe_bytes(data)}.")
    if kind == "dicom":
        from .dicom import DicomError, DicomTooLarge, read_dicom_bytes

        try:
            return read_dicom_bytes(data, name, max_pixels)
        except DicomTooLarge as err:
            raise TooManyPixels(str(err)) from None
        except DicomError as err:
            raise ImageError(str(err)) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise TooManyPixels(f"{name}: {width} x {height} pixels is more than "
                                    f"{max_pixels / 1e6:g} megapixels; send a smaller "
                                    "image.")
            image.load()
            gray = to_gray_uint8(image)
    except TooManyPixels:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError,
            Image.DecompressionBombError) as err:
        raise ImageError(f"{name}: cannot decode this {kind.upper()} image "
                         f"({str(err)[:160]}); send the complete file.") from None
    if looks_inverted(gray):
        if notes is not None:
            notes.append(INVERTED_NOTE)
        return 255 - gray, None
    return gray, None


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The central (size, size) window of a 2-D array."""
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def decode_size(image_size: int, random_crop: bool) -> int:
    """Side length images are resized to for a model trained with ``random_crop``: the
    crop (random in training, central otherwise) then cuts ``image_size`` from it."""
    return round(image_size / CROP_FRACTION) if random_crop else image_size


def preprocess_array(gray: np.ndarray, image_size: int, geometry: str = "pad",
                     random_crop: bool = False, center: bool = True) -> np.ndarray:
    """2-D uint8 -> (S, S, 1) uint8: to a square (``geometry``), resize, and for a
    ``random_crop`` model resize to ``image_size / 0.875`` then cut the centre window
    (``center=False`` leaves the larger image for the random crop of training)."""
    arr = resize_gray(gray, decode_size(image_size, random_crop), geometry)
    if random_crop and center:
        arr = center_crop(arr, image_size)
    return arr[..., None]


def load_image(path: str | Path, image_size: int, geometry: str = "pad",
               random_crop: bool = False, center: bool = True,
               notes: dict[str, list[str]] | None = None) -> np.ndarray:
    """Decode a file, make it gray, bring it to a square and resize: (S, S, 1) uint8."""
    return preprocess_array(read_gray(path, notes), image_size, geometry, random_crop,
                            center)
