"""How much does a model's error grow when the radiographs' exposure changes?

    python experiments/exposure_probe.py --model RUN/last.keras [--model RUN2/last.keras] \
        --data-dir ../shared/data/rsna-sample/bulk-100px --split selection \
        [--cache-dir DIR] [--out probe.json]

Hospitals' radiographs differ from the RSNA images in exposure and windowing. The
probe scores each model on the images of one split of its run (``split.csv`` beside
the model file) as decoded, and again after a fixed change of every image's gray
values, the same for every image:

* ``darker`` / ``brighter``: 25 gray levels (about 10% of the range) subtracted or added;
* ``contrast 0.8`` / ``contrast 1.2``: the values scaled about the image's mean;
* ``gamma 0.8`` / ``gamma 1.25``: ``255 * (v / 255) ** gamma``;

each clipped to 0-255 and rounded, as a file would hold it. Prints, per model and
change, the MAE, the mean signed error (the shift the change causes) and the MAE
difference from the unchanged images, paired over images (bootstrap, 1,000
resamples, 95% CI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = 1000


def _changes():
    import functools

    import numpy as np

    from boneage_keras.images import load_image

    # each image decoded once, whatever the number of changes
    decoded = functools.lru_cache(maxsize=None)(load_image)

    def shift(delta):
        return lambda v: v + delta

    def contrast(factor):
        return lambda v: (v - v.mean()) * factor + v.mean()

    def gamma(g):
        return lambda v: 255.0 * (v / 255.0) ** g

    table = {"none": None, "darker": shift(-25.0), "brighter": shift(25.0),
             "contrast 0.8": contrast(0.8), "contrast 1.2": contrast(1.2),
             "gamma 0.8": gamma(0.8), "gamma 1.25": gamma(1.25)}

    def reader(change):
        def read(path, image_size, geometry, random_crop):
            image = decoded(path, image_size, geometry, random_crop)
            if change is None:
                return image.copy()
            changed = change(image.astype(np.float64))
            return np.clip(np.rint(changed), 0, 255).astype(np.uint8)
        return read

    return {name: reader(change) for name, change in table.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="a .keras file with the run's split.csv beside it (repeat)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--split", default="selection")
    parser.add_argument("--cache-dir", default=None,
                        help="where the data folder's decode record goes")
    parser.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, str(REPO))

    import numpy as np

    from boneage_keras.evaluate import _attach_paths, _split_rows
    from boneage_keras.files import write_json
    from boneage_keras.inference import open_predictor, predict_images
    from boneage_keras.metrics import paired_bootstrap_mae

    readers = _changes()
    results = []
    for model_path in args.model:
        rows = _split_rows(Path(model_path).parent / "split.csv", args.split)
        rows = _attach_paths(rows, args.data_dir, args.cache_dir)
        truth = rows["boneage"].to_numpy(np.float64)
        male = rows["male"].to_numpy(np.float32)
        model = open_predictor(model_path)
        errors = {}
        for name, read in readers.items():
            pred = predict_images(model, rows["path"].tolist(), male, progress=False,
                                  reader=read).predicted
            errors[name] = pred - truth
        base = np.abs(errors["none"])
        for name, err in errors.items():
            paired = paired_bootstrap_mae(base, np.abs(err), n_resamples=BOOTSTRAP)
            row = {"model": model_path, "change": name, "n": len(truth),
                   "mae": float(np.abs(err).mean()), "mean_error": float(err.mean()),
                   "mae_diff": paired["difference"],
                   "ci95": [paired["ci_low"], paired["ci_high"]]}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<40} {'change':<13} {'MAE':>6} {'mean err':>9} {'vs none (95% CI)':>26}")
    for r in results:
        ci = "" if r["change"] == "none" else (
            f"{r['mae_diff']:+.2f} ({r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f})")
        print(f"{r['model'][-40:]:<40} {r['change']:<13} {r['mae']:6.2f} "
              f"{r['mean_error']:+9.2f} {ci:>26}")
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
