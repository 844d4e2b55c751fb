import numpy as np
import pytest
from PIL import Image

from boneage_keras.images import ImageError, load_image, read_gray


def _save(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


def test_modes_decode_to_gray_uint8(tmp_path):
    gray = np.tile(np.arange(0, 200, 2, dtype=np.uint8), (50, 1))      # 50x100
    p8 = _save(tmp_path, "g8.png", Image.fromarray(gray))
    p16 = _save(tmp_path, "g16.png", Image.fromarray(gray.astype(np.uint16) * 40 + 100))
    prgb = _save(tmp_path, "rgb.png", Image.fromarray(np.stack([gray] * 3, -1)))
    ppal = _save(tmp_path, "pal.png", Image.fromarray(gray).convert("P"))
    assert Image.open(p16).mode.startswith("I")
    for path in (p8, p16, prgb, ppal):
        arr = read_gray(path)
        assert arr.dtype == np.uint8 and arr.shape == (50, 100), path
    np.testing.assert_array_equal(read_gray(prgb), gray)
    assert np.abs(read_gray(ppal).astype(int) - gray).max() <= 8
    sixteen = read_gray(p16)       # stretched from its own range to 0..255
    assert sixteen.min() == 0 and sixteen.max() == 255
    assert np.all(np.diff(sixteen[0].astype(int)) >= 0)


def test_pad_keeps_aspect_and_stretch_does_not(tmp_path):
    arr = np.full((50, 100), 200, dtype=np.uint8)
    path = _save(tmp_path, "wide.png", Image.fromarray(arr))
    padded = load_image(path, 64, "pad")[..., 0]
    assert padded.shape == (64, 64)
    assert padded[0].max() == 0 and padded[-1].max() == 0 and padded[32].min() == 200
    stretched = load_image(path, 64, "stretch")
    assert stretched.shape == (64, 64, 1) and stretched.min() == 200
    cropped = load_image(path, 64, "stretch", random_crop=True)
    assert cropped.shape == (64, 64, 1)
    assert load_image(path, 64, "stretch", random_crop=True, center=False).shape == (73, 73, 1)


def test_corrupt_image_names_file(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageError, match="bad.png"):
        read_gray(path)


def test_real_full_size_radiograph(sample_dir):
    arr = read_gray(sample_dir / "images" / "1437.png")
    assert arr.shape == (2080, 1600) and arr.std() > 10
    small = load_image(sample_dir / "images" / "1437.png", 128)
    assert small.shape == (128, 128, 1)
    assert small[:, :4].max() == 0 and small[:, -4:].max() == 0   # padded sides


def test_crop_to_hand_finds_the_hand_on_real_radiographs(sample_dir):
    """A real radiograph placed off-centre on a larger black film: the crop is the
    radiograph's hand region (plus the margin), wherever it lies."""
    from boneage_keras.images import crop_to_hand, resize_gray

    for image_id in ("1437", "1472", "4360"):
        gray = read_gray(sample_dir / "images" / f"{image_id}.png")
        canvas = np.zeros((gray.shape[0] * 2, gray.shape[1] * 3), np.uint8)
        canvas[300:300 + gray.shape[0], 2000:2000 + gray.shape[1]] = gray
        placed = crop_to_hand(canvas)
        rows, cols = np.nonzero(gray > 20)
        hand_area = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        # the crop keeps (almost) all of the hand and little else
        assert placed.astype(np.int64).sum() >= 0.97 * canvas.astype(np.int64).sum()
        assert placed.size <= 1.35 * hand_area and placed.size < 0.2 * canvas.size
        square = resize_gray(canvas, 64, "hand+pad")
        assert square.shape == (64, 64) and square.mean() > 2 * resize_gray(
            canvas, 64, "pad").mean()
    blank = np.zeros((100, 80), np.uint8)
    assert crop_to_hand(blank).shape == blank.shape          # nothing found: unchanged
    with pytest.raises(ValueError, match="hand\\+pad"):
        resize_gray(blank, 32, "zoom")
