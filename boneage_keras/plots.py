"""Matplotlib figures, written as PNG files (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from .files import replacing


def plot_curves(history_csv: str | Path, out_png: str | Path) -> Path:
    """Loss, MAE and tolerance accuracy per epoch, training vs validation."""
    history = pd.read_csv(history_csv)
    epochs = history["epoch"] + 1 if "epoch" in history else range(1, len(history) + 1)
    panels = [(k, t) for k, t in (("loss", "Loss"), ("mae", "MAE (months)"),
                                  ("tolerance_accuracy", "Tolerance accuracy"))
              if k in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, _) in zip(axes[0], panels):
        ax.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
    _per_epoch_panels(axes[0], [title for _, title in panels])
    fig.suptitle("Training curves")
    return _save(fig, out_png)


def _per_epoch_panels(axes, titles: list[str]) -> None:
    """Title, epoch axis, grid and legend of per-epoch panels."""
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()


def plot_learning_curves(histories: dict[str, Path], out_png: str | Path) -> Path:
    """Validation MAE and tolerance accuracy per epoch, one line per run (benchmark)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, csv in histories.items():
        history = pd.read_csv(csv)
        epochs = history["epoch"] + 1
        axes[0].plot(epochs, history["val_mae"], marker="o", label=name)
        axes[1].plot(epochs, history["val_tolerance_accuracy"], marker="o", label=name)
    _per_epoch_panels(axes, ["Validation MAE (months)", "Validation ±12-month accuracy"])
    fig.suptitle("Learning curves")
    return _save(fig, out_png)


def plot_scatter(y_true, y_pred, out_png, title: str = "Predicted vs true bone age") -> Path:
    """Predicted vs true with the identity line and the ±12-month band."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    high = float(max(np.max(y_true), np.max(y_pred), 1)) * 1.05
    ax.fill_between([0, high], [-12, high - 12], [12, high + 12], color="tab:green",
                    alpha=0.12, label="±12 months")
    ax.plot([0, high], [0, high], color="black", lw=1, label="identity")
    ax.scatter(y_true, y_pred, s=12, alpha=0.6)
    ax.set_xlim(0, high)
    ax.set_ylim(0, high)
    ax.set_xlabel("true bone age (months)")
    ax.set_ylabel("predicted bone age (months)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_age_groups(by_group: dict, out_png, tolerance_months: float = 12.0) -> Path:
    """Tolerance accuracy per age group, bars labelled with n and MAE."""
    labels = list(by_group)
    accuracy = [by_group[g].get("tolerance_accuracy", 0.0) for g in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, accuracy, color="tab:blue")
    for bar, g in zip(bars, labels):
        info = by_group[g]
        text = f"n={info['n']}" + (f"\nMAE {info['mae']:.1f}" if info["n"] else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("true bone age group (months)")
    ax.set_ylabel(f"accuracy within ±{tolerance_months:g} months")
    ax.set_title("Tolerance accuracy by age group")
    return _save(fig, out_png)


def plot_error_histogram(errors, out_png) -> Path:
    """Distribution of signed errors (predicted - true)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(errors, bins=min(40, max(5, len(errors) // 5)), color="tab:purple", alpha=0.8)
    ax.axvline(0, color="black", lw=1)
    ax.axvline(float(np.mean(errors)), color="tab:red", ls="--",
               label=f"mean {np.mean(errors):+.1f}")
    ax.set_xlabel("error: predicted - true (months)")
    ax.set_ylabel("images")
    ax.set_title("Error distribution")
    ax.legend()
    return _save(fig, out_png)


def plot_bland_altman(y_true, y_pred, out_png) -> Path:
    """Difference vs mean of prediction and truth, with bias and 95% limits of agreement."""
    import numpy as np

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    mean, diff = (y_true + y_pred) / 2, y_pred - y_true
    bias, spread = diff.mean(), 1.96 * diff.std(ddof=1) if len(diff) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(mean, diff, s=12, alpha=0.6)
    ax.axhline(bias, color="tab:red", label=f"bias {bias:+.1f}")
    for limit in (bias - spread, bias + spread):
        ax.axhline(limit, color="tab:red", ls="--")
    ax.plot([], [], color="tab:red", ls="--",
            label=f"95% limits {bias - spread:+.1f} / {bias + spread:+.1f}")
    ax.set_xlabel("mean of predicted and true (months)")
    ax.set_ylabel("predicted - true (months)")
    ax.set_title("Bland-Altman")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_examples(images, captions, n_columns: int, out_png,
                  title: str = "Best (top) and worst (bottom) predictions",
                  row_labels=("best", "worst"), heatmaps=None) -> Path:
    """A grid of gray images in rows of ``n_columns``, each with its caption; with
    ``heatmaps`` (one per image, 0-1), each image row gains a Grad-CAM overlay row."""
    n_rows = max(1, (len(images) + n_columns - 1) // n_columns)
    per_row = 2 if heatmaps is not None else 1
    fig, axes = plt.subplots(n_rows * per_row, n_columns,
                             figsize=(2.2 * n_columns, 2.6 * n_rows * per_row), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (image, caption) in enumerate(zip(images, captions)):
        row, col = (k // n_columns) * per_row, k % n_columns
        axes[row][col].imshow(image.squeeze(), cmap="gray", vmin=0, vmax=255)
        axes[row][col].set_title(caption, fontsize=8)
        if heatmaps is not None:
            _overlay(axes[row + 1][col], image, heatmaps[k])
    for r, label in enumerate(row_labels[:n_rows]):
        labels = [label] + (["Grad-CAM"] if heatmaps is not None else [])
        for j, text in enumerate(labels):
            ax = axes[r * per_row + j][0]
            ax.text(-0.1, 0.5, text, transform=ax.transAxes, rotation=90, va="center",
                    ha="right", fontsize=10)
    fig.suptitle(title)
    return _save(fig, out_png)


def _overlay(ax, image, heatmap, alpha: float = 0.45) -> None:
    import numpy as np

    image = np.asarray(image, dtype=float).squeeze()
    heat = np.asarray(heatmap, dtype=float).squeeze()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1,
              extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
    ax.axis("off")


def plot_heatmap(image, heatmap, out_png, title: str = "") -> Path:
    """One radiograph beside its Grad-CAM overlay."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    axes[0].imshow(image.squeeze(), cmap="gray", vmin=0, vmax=255)
    axes[0].axis("off")
    axes[0].set_title("radiograph")
    _overlay(axes[1], image, heatmap)
    axes[1].set_title("Grad-CAM (last conv block)")
    fig.suptitle(title)
    return _save(fig, out_png)


def plot_calibration(calibration: dict, abs_error, std, out_png) -> Path:
    """Left: coverage of the predictive intervals vs their nominal level (the diagonal
    is perfect calibration). Right: |error| vs predicted std with the 90% boundary."""
    import numpy as np

    curve = calibration["curve"]
    nominal = [float(k) for k in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot([0, 1], [0, 1], color="black", lw=1, label="perfect calibration")
    left.plot(nominal, list(curve.values()), marker="o", color="tab:blue",
              label="observed coverage")
    left.fill_between([0, 1], [0, 1], [0, 0], color="tab:red", alpha=0.06)
    left.text(0.55, 0.3, "over-confident\n(too narrow)", color="tab:red", fontsize=9)
    left.text(0.08, 0.62, "under-confident\n(too wide)", color="tab:green", fontsize=9)
    level = calibration["level"]
    left.set_title(f"{level:.0%} interval: coverage {calibration['coverage']:.1%}, "
                   f"mean width {calibration['mean_width']:.1f} mo")
    left.set_xlabel("nominal coverage")
    left.set_ylabel("fraction of true ages inside")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize=8)
    std = np.asarray(std, float)
    right.scatter(std, abs_error, s=10, alpha=0.5)
    line = np.linspace(0, float(std.max()) * 1.05 if len(std) else 1, 50)
    right.plot(line, 1.645 * line, color="tab:red", label="90% interval edge (1.645 std)")
    right.set_xlabel("predicted std (months)")
    right.set_ylabel("|error| (months)")
    right.set_title(calibration["verdict"])
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return _save(fig, out_png)


def _save(fig, out_png) -> Path:
    fig.tight_layout()
    with replacing(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out_png)
