"""Reproducible dataset splits: stratified train/val/test, In-shop, saved and loaded (the course's
open-set split of held-out categories: :mod:`fashsim.data.course_splits`)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from ..fileio import atomic_write_bytes


def train_val_test_split(
    labels: Sequence[int] | np.ndarray,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, np.ndarray]:
    """Indices for 'train', 'val' and 'test' (empty when its fraction is 0), stratified by label.

    The same labels and seed always give the same split; the parts are disjoint and cover all items.
    """
    labels = np.asarray(labels)
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"fractions must be in [0, 1) and sum below 1, got val={val_fraction}, test={test_fraction}")
    indices = np.arange(len(labels))
    parts = {"test": np.empty(0, np.int64), "val": np.empty(0, np.int64)}
    rest = indices
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction == 0:
            continue
        share = fraction * len(labels) / len(rest)
        rest, taken = train_test_split(
            rest, test_size=share, random_state=seed, stratify=labels[rest] if stratify else None
        )
        parts[name] = np.sort(taken)
    return {"train": np.sort(rest), "val": parts["val"], "test": parts["test"]}


def inshop_split(catalog) -> dict[str, np.ndarray]:
    """DeepFashion In-shop's official split: indices of 'train', 'query' and 'gallery' items."""
    status = np.asarray([meta["split"] for meta in catalog.extra])
    return {name: np.flatnonzero(status == name) for name in ("train", "query", "gallery")}


def save_splits(path, splits: dict[str, np.ndarray], **metadata) -> None:
    """Write index arrays (and JSON-able metadata) to an ``.npz`` file, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.int64) for k, v in splits.items()}, __meta__=json.dumps(metadata))
    atomic_write_bytes(path, buffer.getvalue())


def load_splits(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read what :func:`save_splits` wrote: ``(splits, metadata)``."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        return {k: data[k] for k in data.files if k != "__meta__"}, meta
