"""Triplet losses with online mining inside a P×K batch (Hermans, Beyer & Leibe 2017).

All functions take a batch of embeddings ``(B, D)`` and integer labels ``(B,)`` and return a
:class:`LossOutput`: the scalar loss plus statistics that make training legible (and collapse
visible): the fraction of active triplets and the mean hardest-positive / hardest-negative
distance.

Distances: ``"euclidean"`` (L2) or ``"cosine"`` (1 − cosine similarity). For L2-normalised
embeddings the two are monotonic in each other (‖a−b‖² = 2·(1 − cos)).

* **batch-hard**: for every anchor, its farthest positive and nearest negative in the batch;
  hinge ``[d(a,p) − d(a,n) + margin]₊`` or, with ``soft=True``, ``softplus(d(a,p) − d(a,n))``.
* **batch-all**: every valid triplet (a, p, n); the loss averages the non-zero ones.
* **semi-hard**: triplets whose negative is farther than the positive but inside the margin,
  ``d(a,p) < d(a,n) < d(a,p) + margin`` (FaceNet's semi-hard negatives), averaged.

Beyond triplets, :func:`angular_loss` (Wang et al. 2017, "Deep Metric Learning with Angular
Loss") constrains the angle at the *negative* of each triangle instead of a distance difference,
which makes it scale-invariant; it uses every positive pair of the P×K batch and all its
negatives at once (the N-pair form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "cosine")


@dataclass
class LossOutput:
    """A loss and its mining statistics, as detached 0-d tensors on the loss's device: reading them
    (:meth:`floats`) waits for the device, so a training loop reads them in batches, not every step."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self.stats.items()}

    def floats(self) -> dict[str, float]:
        """The statistics as plain numbers (synchronises with the device)."""
        return stats_to_floats(self.stats)


def stats_to_floats(stats: dict) -> dict[str, float]:
    """A dict of 0-d tensors (or numbers) → plain floats, read from the device in one transfer."""
    tensors = [v for v in stats.values() if isinstance(v, torch.Tensor)]
    # float64: counts such as the triplets of a 640-image batch (23 M) are exact
    values = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist()) if tensors else iter(())
    return {k: next(values) if isinstance(v, torch.Tensor) else float(v) for k, v in stats.items()}


def pairwise_distances(embeddings: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """``(B, B)`` distances; Euclidean is computed stably (no NaN gradient at zero distance)."""
    x = embeddings.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        return (1.0 - x @ x.T).clamp_min(0.0)
    if metric != "euclidean":
        raise ValueError(f"metric must be one of {DISTANCES}, got {metric!r}")
    squared = x.pow(2).sum(1)
    d2 = (squared[:, None] + squared[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    zero = d2 == 0
    d = torch.sqrt(d2 + zero.float() * 1e-16)  # sqrt'(0) is infinite: nudge exact zeros
    return d * (~zero).float()


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positives (not self), negatives


def _zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings.sum() * 0.0  # keeps the graph, so backward() still works


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    soft: bool = False,
    metric: str = "euclidean",
) -> LossOutput:
    """Batch-hard triplet loss: hardest positive and hardest negative for every anchor."""
    d = pairwise_distances(embeddings, metric)
    pos, neg = _masks(labels)
    valid = pos.any(1) & neg.any(1)
    count = valid.sum()
    hardest_pos = d.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(~neg, float("inf")).amin(1)
    gap = torch.where(valid, hardest_pos - hardest_neg, 0.0)
    per_anchor = F.softplus(gap) if soft else F.relu(gap + margin)
    active = (gap > 0 if soft else gap + margin > 0) & valid
    n = count.clamp_min(1)
    loss = (per_anchor * valid).sum() / n  # 0 (with a graph, so backward() works) when no anchor is valid
    return LossOutput(
        loss,
        {
            "active_fraction": active.sum() / n,
            "hardest_pos": torch.where(valid, hardest_pos, 0.0).sum() / n,
            "hardest_neg": torch.where(valid, hardest_neg, 0.0).sum() / n,
            "valid_anchors": count,
        },
    )


def _members(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a ``(B, B)`` boolean mask, the columns where it is True, first and padded to
    the fullest row: ``ids (B, W)`` and which of them are real ``(B, W)``."""
    width = int(mask.sum(1).max()) if mask.numel() else 0
    ids = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    return ids, mask.gather(1, ids)


def _triplet_gaps(embeddings, labels, metric):
    """``gap[a, i, j] = d(a, p_i) − d(a, n_j)`` over each anchor's own positives ``p_i`` and
    negatives ``n_j``, with the mask of real (unpadded) triplets.

    Gathering each anchor's positives and negatives first keeps the tensor at
    ``B × (K−1) × (B−K)`` for a P×K batch instead of ``B³`` (12× smaller for P=10, K=16).
    """
    d = pairwise_distances(embeddings, metric)
    pos, neg = _masks(labels)
    pos_ids, pos_real = _members(pos)
    neg_ids, neg_real = _members(neg)
    gap = d.gather(1, pos_ids)[:, :, None] - d.gather(1, neg_ids)[:, None, :]
    valid = pos_real[:, :, None] & neg_real[:, None, :]
    return d, gap, valid, pos, neg


def batch_all_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2, metric: str = "euclidean"
) -> LossOutput:
    """Every valid triplet of the batch; the mean over the triplets with a non-zero loss."""
    d, gap, valid, pos, neg = _triplet_gaps(embeddings, labels, metric)
    losses = F.relu(gap + margin) * valid  # masks by multiplying: boolean indexing is slow on CPU
    n_valid, n_active = valid.sum(), (losses > 0).sum()
    loss = losses.sum() / n_active.clamp_min(1)  # 0 (with a graph) when no triplet is active
    return LossOutput(
        loss,
        {"active_fraction": n_active / n_valid.clamp_min(1), "triplets": n_valid, **_distance_stats(d, pos, neg)},
    )


def semi_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2, metric: str = "euclidean"
) -> LossOutput:
    """Triplets with a semi-hard negative, ``d(a,p) < d(a,n) < d(a,p) + margin``, averaged."""
    d, gap, valid, pos, neg = _triplet_gaps(embeddings, labels, metric)
    semi = valid & (gap < 0) & (gap + margin > 0)
    n_semi = semi.sum()
    return LossOutput(
        ((gap + margin) * semi).sum() / n_semi.clamp_min(1),  # 0 (with a graph) when there is none
        {
            "active_fraction": n_semi / valid.sum().clamp_min(1),
            "triplets": n_semi,
            **_distance_stats(d, pos, neg),
        },
    )


def _distance_stats(d, pos, neg) -> dict[str, torch.Tensor]:
    """Mean hardest-positive and hardest-negative distance over the anchors that have both (0 when none has)."""
    with torch.no_grad():
        valid = pos.any(1) & neg.any(1)
        n = valid.sum().clamp_min(1)
        return {
            "hardest_pos": torch.where(valid, d.masked_fill(~pos, float("-inf")).amax(1), 0.0).sum() / n,
            "hardest_neg": torch.where(valid, d.masked_fill(~neg, float("inf")).amin(1), 0.0).sum() / n,
        }


def angular_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, alpha_degrees: float = 40.0) -> LossOutput:
    """Angular loss in its N-pair form (Wang et al. 2017, eq. 8), as pytorch-metric-learning's
    ``AngularLoss``: for every positive pair (a, p) of the batch, with unit vectors,

    ``log(1 + Σ_n exp(4 tan²α (a + p)·n − 2 (1 + tan²α) a·p))``  over the negatives n of a,

    averaged over the pairs. A term is positive ("active") when the angle at n of the triangle
    (a, p, n) is wider than α, i.e. n sits too close to the pair's midpoint.
    """
    x = F.normalize(embeddings.float(), dim=1)
    pos, neg = _masks(labels)
    a_idx, p_idx = pos.nonzero(as_tuple=True)
    if len(a_idx) == 0 or not neg.any():
        return LossOutput(_zero_loss(embeddings), {"active_fraction": 0.0})
    tan2 = math.tan(math.radians(alpha_degrees)) ** 2
    anchors, positives = x[a_idx], x[p_idx]
    ap_dot = (anchors * positives).sum(1, keepdim=True)  # (pairs, 1)
    terms = 4.0 * tan2 * (anchors + positives) @ x.T - 2.0 * (1.0 + tan2) * ap_dot  # (pairs, B)
    keep = neg[a_idx]  # the negatives of each pair's anchor
    terms = terms.masked_fill(~keep, float("-inf"))
    zeros = torch.zeros_like(ap_dot)  # the "1 +" inside the log
    per_pair = torch.logsumexp(torch.cat([zeros, terms], dim=1), dim=1)
    d = pairwise_distances(x)
    return LossOutput(
        per_pair.mean(),
        {
            "active_fraction": ((terms > 0) & keep).sum() / keep.sum().clamp_min(1),
            "pairs": len(a_idx),
            **_distance_stats(d, pos, neg),
        },
    )


MINING = {
    "batch_hard": batch_hard_triplet_loss,
    "batch_all": batch_all_triplet_loss,
    "semi_hard": semi_hard_triplet_loss,
}


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    mining: str = "batch_hard",
    margin: float = 0.2,
    soft: bool = False,
    metric: str = "euclidean",
) -> LossOutput:
    """Dispatch by ``mining`` name (``batch_hard``, ``batch_all``, ``semi_hard``)."""
    if mining not in MINING:
        raise ValueError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")
    if mining == "batch_hard":
        return batch_hard_triplet_loss(embeddings, labels, margin=margin, soft=soft, metric=metric)
    if soft:
        raise ValueError("soft margin is defined for batch_hard mining only")
    return MINING[mining](embeddings, labels, margin=margin, metric=metric)
