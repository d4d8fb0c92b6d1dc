"""Checkpoints: everything a run needs to continue after an interruption, written atomically."""

from __future__ import annotations

import torch

from ..errors import FashsimError
from ..fileio import atomic_torch_save

#: settings that may differ between an interrupted run and its continuation.
RESUMABLE_CHANGES = {"epochs", "max_seconds", "patience", "device", "amp"}


def save_checkpoint(path, config, model, optimizer, scaler, generator, state: dict) -> None:
    """Model, optimiser, gradient scaler, random states and the loop's ``state`` (on CPU tensors)."""
    atomic_torch_save(
        {
            "config": config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        },
        path,
    )


def restore_checkpoint(path, config, model, optimizer, scaler, generator) -> dict:
    """Load what :func:`save_checkpoint` wrote into the given objects; returns the loop's state.
    A checkpoint of another configuration (beyond :data:`RESUMABLE_CHANGES`) is refused."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise FashsimError(f"checkpoint {path} is unreadable ({exc}); delete it or pass resume=False") from None
    saved = blob["config"]
    changed = {k for k in saved if saved[k] != config.to_dict().get(k)} - RESUMABLE_CHANGES
    if changed:
        raise FashsimError(
            f"checkpoint {path} was made with a different configuration ({', '.join(sorted(changed))});"
            " use another output folder or resume=False"
        )
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if scaler.is_enabled() and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    generator.set_state(blob["generator"])
    torch.set_rng_state(blob["torch_rng"])
    return blob["state"]
