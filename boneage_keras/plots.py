"""Matplotlib figures, written as PNG files (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_curves(history_csv: str | Path, out_png: str | Path) -> Path:
    """Loss, MAE and tolerance accuracy per epoch, training vs validation."""
    history = pd.read_csv(history_csv)
    epochs = history["epoch"] + 1 if "epoch" in history else range(1, len(history) + 1)
    panels = [(k, t) for k, t in (("loss", "Loss"), ("mae", "MAE (months)"),
                                  ("tolerance_accuracy", "Tolerance accuracy"))
              if k in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
