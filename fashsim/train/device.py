"""Where and in which precision a run computes: device choice, mixed precision, seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..errors import FashsimError
from .config import TrainConfig


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU (using every core)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise FashsimError(
            "device 'cuda' was asked for but no CUDA GPU is available; use device 'auto' or 'cpu' "
            "(command line: --device auto)"
        )
    device = torch.device(requested)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    return device


def amp_enabled(config: TrainConfig, device: torch.device) -> bool:
    """float16 mixed precision with a gradient scaler (the GPU path): on CUDA only, never on a CPU."""
    return bool(config.amp and device.type == "cuda")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles); elsewhere
    PyTorch emulates it and bfloat16 runs slower than float32."""
    cpu = getattr(torch, "cpu", None)
    return any(
        getattr(cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision type of the forward pass, ``None`` for plain float32: float16 on CUDA
    (:func:`amp_enabled`), bfloat16 on a CPU with native bf16, float32 on any other CPU or with
    ``config.amp=False`` (only ``config.amp`` is read: the shop's training config uses it too).
    The loss, the optimiser state and evaluation stay in float32 either way
    (``benchmarks/bench_training.py`` records which precision a run used)."""
    if amp_enabled(config, device):
        return torch.float16
    if config.amp and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
