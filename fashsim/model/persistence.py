"""Saving and loading models, and the fingerprint that ties an index to the model that built it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..data.transforms import InputSpec
from ..errors import FashsimError
from ..fileio import atomic_torch_save
from .networks import EmbeddingNet


def hash_weights(digest, module: nn.Module) -> None:
    """Feed every parameter and buffer of ``module`` (name and bytes, in name order) into a
    ``hashlib`` digest."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def fingerprint(model: EmbeddingNet) -> str:
    """A short hash of the model's config and weights: an index built with one model refuses
    to be searched with another."""
    digest = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    hash_weights(digest, model)
    return digest.hexdigest()[:16]


def save_model(model: EmbeddingNet, path: str | os.PathLike, **metadata) -> Path:
    """Save config + weights (+ JSON-able metadata) atomically, loadable on any device."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save({"config": model.config, "state_dict": state, "metadata": metadata}, path)


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> EmbeddingNet:
    """Rebuild a model saved by :func:`save_model` (eval mode, on ``device``)."""
    path = Path(path)
    if not path.is_file():
        raise FashsimError(f"no model at {path}: train one first (notebook 02 or `python -m fashsim train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config = blob["config"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        # torch's own message suggests weights_only=False, which is unsafe advice for a file of unknown origin
        raise FashsimError(
            f"{path} is not a readable fashsim model (a file saved by save_model: model.pt; torch.load "
            f"failed with {type(exc).__name__})"
        ) from None
    try:
        model = EmbeddingNet(
            config["backbone"],
            embedding_dim=config["embedding_dim"],
            in_channels=config["in_channels"],
            input_spec=InputSpec.from_dict(config["input_spec"]),
            num_classes=config.get("num_classes", 0),
            multi_scale=config.get("multi_scale", False),
            flip_average=config.get("flip_average", False),
            backbone_widths=config.get("backbone_widths"),
        )
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a checkpoint.pt, or config and weights disagree
        hint = " (a training checkpoint? load the model.pt beside it)" if "optimizer" in blob else ""
        raise FashsimError(f"{path} is not a fashsim model this version can rebuild{hint}: {exc!r}"[:600]) from None
    model.config["weights"] = config.get("weights")  # where it started; the state above is what it became
    return model.to(device).eval()
