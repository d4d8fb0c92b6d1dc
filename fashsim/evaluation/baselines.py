"""Baselines: the comparison points every trained embedding is measured against — raw pixels,
PCA-128 of the pixels (fitted on training images), an untrained backbone."""

from __future__ import annotations

import numpy as np

BASELINES = ("raw_pixels", "pca_128", "untrained")


def baseline_embeddings(
    name: str, images: np.ndarray, *, train_images: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Embeddings of ``images`` (uint8, N×28×28) by a baseline: ``raw_pixels`` (flattened),
    ``pca_128`` (PCA fitted on ``train_images``), ``untrained`` (the small CNN, random weights)."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    if name == "raw_pixels":
        return flat
    if name == "pca_128":
        from sklearn.decomposition import PCA

        if train_images is None:
            raise ValueError("pca_128 needs train_images to fit on")
        fit = train_images.reshape(len(train_images), -1).astype(np.float32) / 255.0
        pca = PCA(n_components=128, random_state=seed).fit(fit)
        return pca.transform(flat).astype(np.float32)
    if name == "untrained":
        import torch

        from ..model.inference import embed_arrays
        from ..model.networks import EmbeddingNet

        torch.manual_seed(seed)
        return embed_arrays(EmbeddingNet("small_cnn").eval(), images)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
