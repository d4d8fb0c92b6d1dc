"""Backbone features computed once and cached: the CPU path for pretrained backbones.

On two CPU cores a 224 px backbone trains at only ~15–20 images/s, so fine-tuning it is the GPU
path. On a CPU the backbone stays **frozen**: every image goes through it once
(:func:`extract_features`), the features are cached on disk (:func:`cached_features`, keyed by
the backbone's weights, the input format and the images themselves), and only the small triplet
head (projection + BN-neck) is trained on them — thousands of steps per minute.
:func:`fashsim.training.train` does this when ``TrainConfig.freeze_backbone`` is set.

Photo catalogs on disk (:class:`fashsim.catalogs.FileCatalog`) become in-memory arrays in the
model's input format with :func:`load_catalog_images`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from .catalogs import FileCatalog
from .errors import FashsimError, InvalidImageError
from .fashion_mnist import ImageArrayDataset
from .fileio import atomic_write_bytes
from .images import InputSpec, load_image, normalise_batch, prepare_image
from .models import hash_weights


def load_catalog_images(catalog: FileCatalog, spec: InputSpec, *, progress: bool = True) -> ImageArrayDataset:
    """Decode and prepare every catalog image for a model with input ``spec``: uint8
    ``(N, size, size[, 3])`` in memory. Unreadable files stop it with one error listing them all
    (nothing is skipped silently)."""
    from tqdm.auto import tqdm

    shape = (spec.size, spec.size) if spec.channels == 1 else (spec.size, spec.size, 3)
    images = np.zeros((len(catalog), *shape), np.uint8)
    bad = []
    for i, path in enumerate(tqdm(catalog.paths, desc="loading images", disable=not progress)):
        try:
            prepared = prepare_image(load_image(path), spec)
        except InvalidImageError as exc:
            bad.append(f"{path}: {exc}")
            continue
        images[i] = prepared
    if bad:
        listed = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise FashsimError(
            f"{len(bad)} of {len(catalog)} catalog images cannot be read; fix or remove them:\n  {listed}")
    return ImageArrayDataset(images, np.asarray(catalog.labels, np.int64), tuple(catalog.class_names), source="catalog")


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: np.ndarray, spec: InputSpec, *, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """Pooled backbone features ``(N, F)`` float32 of uint8 images, in eval mode, in batches."""
    from tqdm.auto import tqdm

    was_training = backbone.training
    backbone.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="backbone features", disable=not progress):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)  # a writable copy: inputs may be read-only
        x = normalise_batch(batch, spec).contiguous(memory_format=torch.channels_last)
        out.append(backbone(x).float().flatten(1).cpu().numpy())
    backbone.train(was_training)
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out)


def features_key(backbone: torch.nn.Module, images: np.ndarray, spec: InputSpec) -> str:
    """A hash of everything the features depend on: backbone weights, input format, images."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    hash_weights(digest, backbone)
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:20]


def cached_features(backbone: torch.nn.Module, images: np.ndarray, spec: InputSpec, cache_dir: str | os.PathLike,
                    **kwargs) -> np.ndarray:
    """:func:`extract_features`, read back from ``cache_dir`` when the same backbone, format and
    images were seen before (the file is written atomically; a damaged one is recomputed)."""
    path = Path(cache_dir) / f"features-{features_key(backbone, images, spec)}.npy"
    if path.is_file():
        try:
            features = np.load(path)
            if len(features) == len(images):
                return features
        except (OSError, ValueError):
            pass
    features = extract_features(backbone, images, spec, **kwargs)
    buffer = io.BytesIO()
    np.save(buffer, features)
    atomic_write_bytes(path, buffer.getvalue())
    return features
