"""Images held in memory with their labels: the dataset type that Fashion-MNIST and photo catalogs share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import DatasetFormatError


@dataclass(frozen=True)
class ImageArrayDataset:
    """Images held in memory: ``images`` uint8 (N, H, W) or (N, H, W, 3), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DatasetFormatError(
                f"{len(self.images)} images but {len(self.labels)} labels in {self.source or 'dataset'}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> ImageArrayDataset:
        """The items at ``indices`` (any numpy index), same class names."""
        idx = np.asarray(indices)
        return ImageArrayDataset(self.images[idx], self.labels[idx], self.class_names, self.source)

    def fingerprint(self) -> str:
        """A short digest that tells data sets apart: every label and class name, the images'
        shape and a sample of their rows (see :func:`update_digest`)."""
        digest = hashlib.sha256("\n".join(self.class_names).encode())
        for array in (self.images, self.labels):
            update_digest(digest, array)
        return digest.hexdigest()[:20]


def update_digest(digest, array: np.ndarray, *, rows: int = 512) -> None:
    """Feed ``array`` to a hashlib ``digest``: its dtype and shape, then all of a 1-D array (labels)
    or about ``rows`` evenly spaced rows of a larger one (images) — enough to tell data sets apart,
    cheap for large ones."""
    array = np.asarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if array.ndim > 1:
        array = array[:: max(1, len(array) // rows)]
    digest.update(np.ascontiguousarray(array).tobytes())
