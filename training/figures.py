"""Figures written by training and evaluation (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402


def image_grid(rows: Sequence[Sequence[np.ndarray]], row_titles: Sequence[str], path: Path,
               col_titles: Sequence[str] | None = None, cmaps: Sequence[str | None] | None = None) -> Path:
    """Save a grid: one row per list in ``rows``, same number of panels per row."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.6 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c], cmap=(cmaps[r] if cmaps else None) or "gray", interpolation="nearest")
            title = col_titles[c] if col_titles and r == 0 and c < len(col_titles) else ""
            if c == 0:
                title = f"{row_titles[r]}: {title}" if title else row_titles[r]
            if title:
                ax.set_title(title, fontsize=9 if c == 0 else 8, loc="left" if c == 0 else "center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_history(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and accuracy curves, train vs validation."""
    metrics = [m for m in ("loss", "accuracy") if m in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def outline_overlay(image: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """The image with every instance's outline drawn in one colour (for comparison figures)."""
    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out
