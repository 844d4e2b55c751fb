"""Fit the inverted-image detector of boneage_keras.images on the real sample.

    .venv/bin/python scripts/fit_inversion_detector.py [--sample ../shared/data/rsna-sample]

Every real radiograph (the 60 full-size and the 12,111 100 px images) and its inverted
copy (255 - pixels) are described by ``images.inversion_features``; a logistic
regression (the two sets weighted equally) separates them. It prints the rates,
cross-validated over 5 folds grouped by image (an image and its copy are always in the
same fold), and the coefficients to paste into ``images.INVERSION_WEIGHTS``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict

from boneage_keras.images import inversion_features, read_gray


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample", default=str(Path(__file__).resolve().parents[2]
                                                 / "shared" / "data" / "rsna-sample"))
    args = parser.parse_args()
    sample = Path(args.sample)
    rows, labels, groups, sets = [], [], [], []
    for name, folder in (("full-size", sample / "images"),
                         ("100px", sample / "bulk-100px" / "images")):
        for path in sorted(folder.glob("*.png")):
            gray = read_gray(path, fix_inverted=False)
            for inverted, image in ((0, gray), (1, 255 - gray)):
                rows.append(inversion_features(image))
                labels.append(inverted)
                groups.append(f"{name}/{path.stem}")
                sets.append(name)
    x, y, sets = np.array(rows), np.array(labels), np.array(sets)
    weight = np.where(sets == "full-size", (sets == "100px").sum() / (sets == "full-size")
                      .sum(), 1.0)
    model = LogisticRegression(C=100, max_iter=5000)
    p = cross_val_predict(model, x, y, groups=groups, cv=GroupKFold(5),
                          method="predict_proba", params={"sample_weight": weight})[:, 1]
    for name in ("full-size", "100px"):
        real, copies = (sets == name) & (y == 0), (sets == name) & (y == 1)
        print(f"{name}: real images flagged {int((p[real] > 0.5).sum())} of "
              f"{int(real.sum())}; inverted copies missed {int((p[copies] <= 0.5).sum())} "
              f"of {int(copies.sum())} (cross-validated)")
    model.fit(x, y, sample_weight=weight)
    print("INVERSION_WEIGHTS =", tuple(round(float(c), 4) for c in model.coef_[0]))
    print("INVERSION_BIAS =", round(float(model.intercept_[0]), 4))


if __name__ == "__main__":
    main()
