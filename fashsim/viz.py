"""Figures for the notebooks and the report. Every function returns a matplotlib Figure;
:func:`save_figure` writes it to ``reports/figures/<name>.png``. Deterministic given a seed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .paths import reports_dir


def figures_dir() -> Path:
    """``reports/figures`` (created on demand)."""
    folder = reports_dir() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig, name: str, folder: str | os.PathLike | None = None, *, dpi: int = 120) -> Path:
    """Save ``fig`` as ``<folder or reports/figures>/<name>.png`` and return the path."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _show(ax, image, cmap="gray") -> None:
    image = np.asarray(image)
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0, vmax=255 if image.dtype == np.uint8 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(
    images: Sequence[np.ndarray],
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 10,
    cell_size: float = 1.2,
    suptitle: str | None = None,
):
    """Images in a grid, optionally titled."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell_size, nrows * (cell_size + 0.25)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def class_sample_grid(images, labels, class_names: Sequence[str], *, per_class: int = 10, seed: int = 0):
    """One row per class with ``per_class`` random examples, class names on the left."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fig, axes = plt.subplots(len(class_names), per_class, figsize=(per_class * 0.9, len(class_names) * 0.95), squeeze=False)
    for row, name in enumerate(class_names):
        members = np.flatnonzero(labels == row)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for col, ax in enumerate(axes[row]):
            if col < len(chosen):
                _show(ax, images[chosen[col]])
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def class_balance(splits: Mapping[str, np.ndarray], class_names: Sequence[str]):
    """Grouped bar chart: images per class in each split (``{"train": labels, "val": labels, ...}``)."""
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(class_names))
    for i, (name, labels) in enumerate(splits.items()):
        counts = np.bincount(np.asarray(labels), minlength=len(class_names))
        ax.bar(x + i * width, counts, width, label=f"{name} ({len(labels)})")
    ax.set_xticks(x + width * (len(splits) - 1) / 2, class_names, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Class balance per split")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax.legend(loc="upper center", ncol=len(splits))
    fig.tight_layout()
    return fig


def pk_batch_figure(images, labels, class_names: Sequence[str], p: int, k: int):
    """One P×K batch: a row per class (P rows), its K images across."""
    labels = np.asarray(labels)
    fig, axes = plt.subplots(p, k, figsize=(k * 0.9, p * 0.95), squeeze=False)
    for row in range(p):
        for col in range(k):
            _show(axes[row, col], images[row * k + col])
        axes[row, 0].set_ylabel(class_names[labels[row * k]], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"One P×K batch: P={p} classes × K={k} images")
    fig.tight_layout()
    return fig
