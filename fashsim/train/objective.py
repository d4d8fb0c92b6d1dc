"""The loss of one batch: what a training step minimises, as one pure function.

:func:`compute_loss` embeds a P×K batch, applies the configured loss — triplet with batch-hard,
batch-all or semi-hard mining (with an optional warm-up mining for the first steps), angular, or
the cross-entropy baseline — adds ``ce_weight`` × cross-entropy on the BN-neck when asked
(Luo et al. 2019), and returns the loss with its statistics (mining statistics, and the batch's
mean pairwise distance ``spread`` that the collapse watch reads).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .losses import angular_loss, pairwise_distances, stats_to_floats, triplet_loss

__all__ = ["Batch", "compute_loss", "mining_at", "stats_to_floats"]


class Batch(NamedTuple):
    """Model inputs (normalised images, or cached backbone features when the backbone is frozen) and labels."""

    inputs: torch.Tensor
    labels: torch.Tensor


def mining_at(config: TrainConfig, step: int) -> str:
    """The mining used at ``step``: ``warmup_mining`` for the first ``warmup_steps``, then ``mining``."""
    return config.warmup_mining if (config.warmup_mining and step < config.warmup_steps) else config.mining


def compute_loss(config: TrainConfig, model, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, stats)`` of ``batch`` for ``model`` at training step ``step`` (no side effects). The
    statistics are detached 0-d tensors on the model's device (:func:`stats_to_floats` reads them)."""
    raw = model.head(batch.inputs) if config.freeze_backbone else model.raw_embedding(batch.inputs)
    embeddings = F.normalize(raw.float(), dim=1)
    stats: dict[str, torch.Tensor] = {}
    if config.loss == "cross_entropy":
        loss = F.cross_entropy(model.classifier(raw).float(), batch.labels)
    else:
        if config.loss == "angular":
            out = angular_loss(embeddings, batch.labels, alpha_degrees=config.angular_alpha)
        else:
            mining = mining_at(config, step)
            out = triplet_loss(
                embeddings,
                batch.labels,
                mining=mining,
                margin=config.margin,
                soft=config.soft_margin and mining == "batch_hard",
                metric=config.metric,
            )
        loss, stats = out.loss, dict(out.stats)
        if config.ce_weight > 0:
            ce = F.cross_entropy(model.classifier(raw).float(), batch.labels)
            loss = loss + config.ce_weight * ce
            stats["cross_entropy"] = ce.detach()
    with torch.no_grad():
        d = pairwise_distances(embeddings.detach(), "euclidean")
        stats["spread"] = d.sum() / max(1, d.numel() - len(d))
    stats["loss"] = loss.detach()
    return loss, stats
