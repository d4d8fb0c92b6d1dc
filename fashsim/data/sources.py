"""Item sources: the string that says where a catalog item's picture lives, and its pixels.

A ``source`` is an image path, or ``fashion-mnist:<split>:<n>`` for a Fashion-MNIST image;
:func:`load_source_image` turns either back into pixels (thumbnails, retrieval grids).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .fashion_mnist import SPLIT_SIZES, load_fashion_mnist
from .uploads import load_image

FMNIST_PREFIX = "fashion-mnist:"


def fashion_mnist_source(split: str, index: int) -> str:
    """The catalog ``source`` of a Fashion-MNIST image."""
    return f"{FMNIST_PREFIX}{split}:{int(index)}"


def fashion_mnist_id(split: str, index: int) -> int:
    """The catalog id of a Fashion-MNIST image: the train images first, then the test images."""
    return (0 if split == "train" else SPLIT_SIZES["train"]) + int(index)


@lru_cache(maxsize=2)
def _fmnist_split(split: str):
    return load_fashion_mnist(split)


def load_source_image(source: str) -> np.ndarray:
    """Pixels of a catalog item (uint8 array) from its ``source`` string."""
    if source.startswith(FMNIST_PREFIX):
        _, split, index = source.split(":")
        return _fmnist_split(split).images[int(index)]
    return np.asarray(load_image(source))
