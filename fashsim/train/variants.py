"""Training variants: several recipes trained on the same data, seed and wall-clock budget, so that
:mod:`fashsim.evaluation.variants` can compare them on equal terms (notebook 07)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..data.datasets import ImageArrayDataset
from .config import TrainConfig
from .loop import train

#: Training variants: TrainConfig overrides on top of the default recipe.
VARIANTS: dict[str, dict] = {
    "default (batch-all triplet)": {},
    "batch-hard triplet": {"mining": "batch_hard"},
    "multi-scale head": {"multi_scale": True},
    "angular loss": {"loss": "angular"},
    "angular + multi-scale (the paper)": {"loss": "angular", "multi_scale": True},
}


def train_variants(
    train_data: ImageArrayDataset,
    val_data: ImageArrayDataset,
    out_dir: str | Path,
    *,
    seconds: float,
    variants: dict[str, dict] | None = None,
    base: TrainConfig | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Train each variant for ``seconds`` (same data, seed and budget); returns
    ``{name: {"model", "train_seconds", "epochs"}}``. Runs resume from ``out_dir/<n>``."""
    base = base or TrainConfig.budgeted(seconds)
    results = {}
    for i, (name, overrides) in enumerate((variants or VARIANTS).items()):
        config = replace(base, max_seconds=seconds, **overrides)
        result = train(config, train_data, val_data, Path(out_dir) / f"variant{i}", progress=progress)
        last = result.history[-1] if result.history else {}
        results[name] = {
            "model": result.model,
            "train_seconds": last.get("train_seconds", 0.0),
            "epochs": last.get("epoch", 0),
        }
    return results
