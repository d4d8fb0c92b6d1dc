"""The course's Fashion-MNIST splits, made in one place and read by every notebook.

Notebook 01 makes them (:func:`make_course_splits`) and saves them to
``data/processed/fashion_mnist_splits.npz``; every later notebook, the CLI and the benchmarks
read that file through :func:`course_splits` (and compute the same defaults when notebook 01 has
not run yet, so each notebook still runs standalone).

* ``train`` / ``val`` — a stratified cut of the official 60 000 training images;
* ``open_train`` / ``open_val`` — the same two parts without the held-out categories: the
  open-set model never sees those categories, and is tested on the official test images of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import data_dir
from .datasets import ImageArrayDataset
from .fashion_mnist import CLASS_NAMES, load_fashion_mnist
from .splits import load_splits, save_splits, train_val_test_split

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 0
#: categories the open-set model never sees: two upper-body garments and a shoe.
DEFAULT_OPEN_SET_HOLDOUT = ("Coat", "Shirt", "Sneaker")


def splits_file() -> Path:
    """``data/processed/fashion_mnist_splits.npz``."""
    return data_dir() / "processed" / "fashion_mnist_splits.npz"


def make_course_splits(
    labels: np.ndarray,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    open_set_holdout=DEFAULT_OPEN_SET_HOLDOUT,
) -> tuple[dict[str, np.ndarray], dict]:
    """Index arrays into the official train split and their settings (see the module docstring)."""
    unknown = [name for name in open_set_holdout if name not in CLASS_NAMES]
    if unknown or not open_set_holdout:
        raise ValueError(
            f"open_set_holdout must name Fashion-MNIST categories ({', '.join(CLASS_NAMES)}), "
            f"got {list(open_set_holdout)}"
        )
    closed = train_val_test_split(labels, val_fraction=val_fraction, seed=seed)
    holdout_ids = [CLASS_NAMES.index(name) for name in open_set_holdout]
    seen = {part: closed[part][~np.isin(labels[closed[part]], holdout_ids)] for part in ("train", "val")}
    parts = {"train": closed["train"], "val": closed["val"], "open_train": seen["train"], "open_val": seen["val"]}
    meta = {"val_fraction": val_fraction, "seed": seed, "open_set_holdout": list(open_set_holdout)}
    return parts, meta


def save_course_splits(parts: dict[str, np.ndarray], meta: dict, path: str | Path | None = None) -> Path:
    """Save the course's split indices and settings (default: :func:`splits_file`); returns the path."""
    path = Path(path) if path is not None else splits_file()
    save_splits(path, parts, **meta)
    return path


def course_splits(path: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The splits notebook 01 saved, or — when it has not run — the defaults computed now."""
    path = Path(path) if path is not None else splits_file()
    if path.is_file():
        return load_splits(path)
    return make_course_splits(load_fashion_mnist("train").labels)


@dataclass(frozen=True)
class OpenSet:
    """The open-set protocol: train on seen categories, test on categories never seen in training."""

    train: ImageArrayDataset
    val: ImageArrayDataset
    unseen_test: ImageArrayDataset
    seen_test: ImageArrayDataset
    holdout: tuple[str, ...]


def load_course_train_val() -> tuple[ImageArrayDataset, ImageArrayDataset]:
    """The course's train and validation images (:func:`course_splits`)."""
    parts, _ = course_splits()
    full = load_fashion_mnist("train")
    return full.subset(parts["train"]), full.subset(parts["val"])


def load_open_set(test: ImageArrayDataset | None = None) -> OpenSet:
    """The open-set datasets of :func:`course_splits` (``test``: the official test split, or a subset of it)."""
    parts, meta = course_splits()
    full = load_fashion_mnist("train")
    test = test if test is not None else load_fashion_mnist("test")
    holdout_ids = [CLASS_NAMES.index(name) for name in meta["open_set_holdout"]]
    unseen = np.isin(test.labels, holdout_ids)
    return OpenSet(
        full.subset(parts["open_train"]),
        full.subset(parts["open_val"]),
        test.subset(np.flatnonzero(unseen)),
        test.subset(np.flatnonzero(~unseen)),
        tuple(meta["open_set_holdout"]),
    )
