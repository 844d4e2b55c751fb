"""Does the model learn on real radiographs? It must beat predicting the training mean."""

import numpy as np
import pandas as pd

from boneage_keras.evaluate import evaluate_run


def test_beats_training_mean_on_real_images(trained_run):
    split = pd.read_csv(trained_run / "split.csv")
    train_mean = split.loc[split["split"] == "train", "boneage"].mean()
    val = split.loc[split["split"] == "val", "boneage"].to_numpy()
    baseline = np.mean(np.abs(val - train_mean))
    history = pd.read_csv(trained_run / "history.csv")
    best_val_mae = history["val_mae"].min()
    print(f"baseline (training mean) {baseline:.2f}, best val MAE {best_val_mae:.2f}")
    assert baseline > 25          # real bone ages spread widely
    assert best_val_mae < 0.85 * baseline   # at least 15% better than the mean
    # the saved best model reproduces it on the held-out test split
    result = evaluate_run(trained_run, split="test", out_dir=trained_run / "eval-test")
    test = split.loc[split["split"] == "test", "boneage"].to_numpy()
    assert result.metrics["mae"] < np.mean(np.abs(test - train_mean))
