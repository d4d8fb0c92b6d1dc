"""Images held in memory with their labels: the dataset type that Fashion-MNIST and photo catalogs share."""

from __future__ import annotations

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
