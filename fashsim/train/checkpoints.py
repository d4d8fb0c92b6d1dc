"""Checkpoints: everything a run needs to continue after an interruption, written atomically.

A checkpoint remembers the configuration and a fingerprint of the data it was made with; a run
of another configuration or on other data does not continue it (:class:`CheckpointMismatchError`),
and :func:`set_aside` keeps the earlier run's files instead of overwriting them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..errors import FashsimError
from ..fileio import atomic_torch_save

#: settings that may differ between an interrupted run and its continuation.
RESUMABLE_CHANGES = {"epochs", "max_seconds", "patience", "device", "amp", "val_every"}


class CheckpointMismatchError(FashsimError):
    """The checkpoint belongs to another run: another configuration, or other training data."""


def save_checkpoint(path, config, model, optimizer, scaler, generator, state: dict, *, data_key: str = "") -> None:
    """Model, optimiser, gradient scaler, random states and the loop's ``state`` (on CPU tensors),
    with the configuration and ``data_key`` (the data's fingerprint) that a resume must match."""
    atomic_torch_save(
        {
            "config": config.to_dict(),
            "data_key": data_key,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        },
        path,
    )


def restore_checkpoint(path, config, model, optimizer, scaler, generator, *, data_key: str = "") -> dict:
    """Load what :func:`save_checkpoint` wrote into the given objects; returns the loop's state.

    A checkpoint of another configuration (beyond :data:`RESUMABLE_CHANGES`) or, where both
    fingerprints are known, of other data raises :class:`CheckpointMismatchError` and loads nothing."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise FashsimError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); start afresh with `fashsim train --fresh` "
            "(resume=False): the earlier run's files are then kept in superseded/"
        ) from None
    saved = blob["config"]
    changed = {k for k in saved if saved[k] != config.to_dict().get(k)} - RESUMABLE_CHANGES
    if changed:
        raise CheckpointMismatchError(f"a different configuration ({', '.join(sorted(changed))})")
    if data_key and blob.get("data_key") and blob["data_key"] != data_key:
        raise CheckpointMismatchError("other training or validation data")
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if scaler.is_enabled() and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    generator.set_state(blob["generator"])
    torch.set_rng_state(blob["torch_rng"])
    return blob["state"]


def set_aside(out_dir: str | Path, names, why: str) -> Path | None:
    """Move the files ``names`` of an earlier run in ``out_dir`` into ``out_dir/superseded/<UTC time>/``
    and say ``why``; returns that folder (None when there was nothing to move)."""
    out_dir = Path(out_dir)
    present = [out_dir / name for name in names if (out_dir / name).is_file()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = out_dir / "superseded" / stamp, 1
    while target.exists():
        target, n = out_dir / "superseded" / f"{stamp}-{n}", n + 1
    target.mkdir(parents=True)
    for path in present:
        shutil.move(path, target / path.name)
    print(f"{why}: training afresh; the earlier run is kept in {target}", flush=True)
    return target
