"""Pack a flat data folder (labels.csv + images/*.png) into one tar of lossless WebP
images, to carry it to a machine where only a few tens of MB can travel (the lent GPU
machine takes 64 MiB in all): the 12,111 bulk-100px PNGs (88 MB) become a 53 MB archive (gzip only
shrinks the tar headers; WebP data does not compress further).
Every image is decoded again and compared with the original: the pixels are identical.

    python scripts/pack-webp.py ../shared/data/rsna-sample/bulk-100px .gpu-data/bulk-webp.tar.gz
    tar xf .gpu-data/bulk-webp.tar.gz -C /tmp/bulk     # there: labels.csv + images/*.webp
"""
import io
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def webp_bytes(path: Path) -> bytes:
    with Image.open(path) as image:
        mode, pixels = image.mode, np.asarray(image)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    again = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode))
    if not np.array_equal(again, pixels):
        raise SystemExit(f"{path}: WebP round trip changed pixels")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main(src: str, out: str) -> None:
    src_dir = Path(src)
    labels = pd.read_csv(src_dir / "labels.csv", dtype={"id": str})
    paths = [src_dir / "images" / f"{i}.png" for i in labels["id"]]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out + ".part")
    with ThreadPoolExecutor() as pool, tarfile.open(tmp, "w:gz") as tar:
        add(tar, "labels.csv", (src_dir / "labels.csv").read_bytes())
        for k, (i, data) in enumerate(zip(labels["id"], pool.map(webp_bytes, paths)), 1):
            add(tar, f"images/{i}.webp", data)
            if k % 2000 == 0:
                print(f"{k}/{len(paths)}", flush=True)
    tmp.replace(out)
    print(f"{out}: {len(paths)} images, {Path(out).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
