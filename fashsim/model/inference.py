"""Inference: one batched, eval-mode loop that embeds images (search, evaluation) or extracts
backbone features (the frozen-backbone CPU path), and the on-disk cache of those features.

Fine-tuning a 224 px backbone is the GPU path (``benchmarks/bench_pretrained.py`` measures how slow
it is on a CPU). On a CPU the backbone stays **frozen**: every image goes through it once
(:func:`extract_features`), the features are cached on disk (:func:`cached_features`, keyed by
the backbone's weights, the input format and the images themselves), and only the small triplet
head (projection + BN-neck) is trained on them. :func:`fashsim.train.train` does this when
``TrainConfig.freeze_backbone`` is set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.transforms import InputSpec, normalise_batch
from ..fileio import atomic_write_bytes
from .persistence import hash_weights


@torch.inference_mode()
def batched_forward(
    module: torch.nn.Module,
    images: np.ndarray,
    spec: InputSpec,
    *,
    batch_size: int,
    device=None,
    progress: bool = False,
    desc: str = "batches",
) -> list[np.ndarray]:
    """``module`` applied in eval mode to uint8 images ``(N, H, W[, C])`` normalised as ``spec``
    says, ``batch_size`` at a time; returns the float32 outputs of each batch, flattened to 2-d.
    The module's train/eval mode is restored afterwards (and touched only when it must be, so a
    single search query stays cheap)."""
    device = device or next(module.parameters()).device
    was_training = module.training
    if was_training:
        module.eval()
    out = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            batch = torch.from_numpy(np.array(images[start : start + batch_size]))  # a writable copy
            x = normalise_batch(batch.to(device), spec).contiguous(memory_format=torch.channels_last)
            out.append(module(x).float().flatten(1).cpu().numpy())
    finally:
        if was_training:
            module.train()
    return out


def embed_arrays(
    model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 1024, device=None, progress: bool = False
) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of uint8 images with an :class:`~fashsim.model.EmbeddingNet`
    (also the path of a single search query)."""
    out = batched_forward(
        model, images, model.input_spec, batch_size=batch_size, device=device, progress=progress, desc="embedding"
    )
    return np.concatenate(out) if out else np.zeros((0, model.embedding_dim), np.float32)


def embed_image_files(
    model: torch.nn.Module,
    paths,
    *,
    batch_size: int = 256,
    workers: int = 2,
    device=None,
    progress: bool = False,
) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of the image files at ``paths`` with an
    :class:`~fashsim.model.EmbeddingNet`, decoded batch by batch by ``DataLoader`` workers (the
    images are never all in memory: a catalog too large for it). The files must be readable (an
    unreadable one would get a blank image's embedding): check them first, e.g. with
    :func:`fashsim.data.catalogs.stream_images`."""
    from ..data.catalogs import image_batches

    out = np.zeros((len(paths), model.embedding_dim), np.float32)
    with tqdm(total=len(paths), desc="embedding", disable=not progress, leave=False) as bar:
        for indices, images, _ in image_batches(paths, model.input_spec, workers=workers, batch_size=batch_size):
            out[indices] = embed_arrays(model, images, batch_size=batch_size, device=device)
            bar.update(len(indices))
    return out


def extract_features(
    backbone: torch.nn.Module,
    images: np.ndarray,
    spec: InputSpec,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Pooled backbone features ``(N, F)`` float32 of uint8 images."""
    out = batched_forward(
        backbone, images, spec, batch_size=batch_size, device=device, progress=progress, desc="backbone features"
    )
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


def cached_features(
    backbone: torch.nn.Module, images: np.ndarray, spec: InputSpec, cache_dir: str | os.PathLike, **kwargs
) -> np.ndarray:
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
