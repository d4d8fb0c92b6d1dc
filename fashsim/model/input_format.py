"""Which input format a network wants: the one place that maps a backbone, its weights and its
training images to an :class:`~fashsim.data.transforms.InputSpec` (size, channels, normalisation)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..data.transforms import FASHION_MNIST_SPEC, IMAGENET_SPEC, InputSpec
from .pretrained import SHIPPED


def default_input_spec(backbone: str, weights: str | None = None, channels: int | None = None) -> InputSpec:
    """What a backbone expects: Fashion-MNIST's format for ``small_cnn``, the pretrained
    weights' normalisation (224 px RGB) for the others; ``channels=1`` for greyscale input
    (the mean of the RGB statistics)."""
    if backbone == "small_cnn":
        spec = FASHION_MNIST_SPEC
    elif backbone in SHIPPED and (weights == "shipped" or backbone == "efficientnet_lite0"):
        entry = SHIPPED[backbone]
        spec = replace(IMAGENET_SPEC, size=entry.size, mean=entry.mean, std=entry.std)
    else:
        spec = IMAGENET_SPEC
    if channels is None or channels == spec.channels:
        return spec
    if channels == 1:
        return replace(spec, channels=1, mean=(sum(spec.mean) / 3,), std=(sum(spec.std) / 3,))
    return replace(spec, channels=3, mean=spec.mean * 3, std=spec.std * 3)


def training_input_spec(config, images: np.ndarray) -> InputSpec:
    """The input format of a model trained on ``images`` (uint8 ``(N, H, W)`` greyscale or
    ``(N, H, W, 3)`` RGB): the backbone's normalisation (Fashion-MNIST's from scratch, the
    weights' when pretrained), at ``config.image_size`` or the images' own size. Greyscale
    training data is taken to be Fashion-MNIST-like (light garment on black): queries are
    prepared the same way."""
    size = config.image_size or images.shape[1]
    greyscale = images.ndim == 3
    weights = config.resolved_weights
    if weights == "random" and greyscale:
        return replace(FASHION_MNIST_SPEC, size=size)
    spec = default_input_spec(config.backbone, "imagenet" if weights == "random" else weights)
    return replace(spec, size=size, dark_background=greyscale)
