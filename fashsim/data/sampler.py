"""P×K batches for online triplet mining: P categories × K images of each, in every batch.

Every batch is valid for batch-hard mining: each anchor has K-1 positives and (P-1)·K negatives.
Within a class, images are drawn from a shuffled queue that is refilled when empty, so an epoch
visits (nearly) every image; a class with fewer than K images repeats some of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """Yields lists of ``p * k`` dataset indices; use as ``DataLoader(batch_sampler=...)``.

    Reproducible: the batches depend only on ``labels``, ``seed`` and the epoch set with
    :meth:`set_epoch` (call it each epoch to get fresh batches).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels)
        if p < 2 or k < 2:
            raise ValueError(f"P×K mining needs p >= 2 classes and k >= 2 images per class, got p={p}, k={k}")
        self.classes, counts = np.unique(self.labels, return_counts=True)
        if len(self.classes) < p:
            raise ValueError(f"p={p} classes per batch but the labels have only {len(self.classes)} classes")
        singletons = self.classes[counts < 2]
        if singletons.size:
            warnings.warn(
                f"{singletons.size} classes have a single image: their anchors have no true positive", stacklevel=2
            )
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}
        self.p, self.k, self.seed = p, k, seed
        self.batches_per_epoch = batches_per_epoch or max(1, len(self.labels) // (p * k))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = {c: rng.permutation(idx).tolist() for c, idx in self.by_class.items()}
        class_order: list[int] = []
        for _ in range(self.batches_per_epoch):
            if len(class_order) < self.p:  # cycle through classes evenly
                class_order += rng.permutation(self.classes).tolist()
            chosen, class_order = class_order[: self.p], class_order[self.p :]
            if len(set(chosen)) < self.p:  # a reshuffle boundary repeated a class: redraw cleanly
                chosen = rng.choice(self.classes, size=self.p, replace=False).tolist()
            batch: list[int] = []
            for c in chosen:
                members = self.by_class[int(c)]
                if len(members) < self.k:
                    batch += members.tolist() + rng.choice(members, self.k - len(members)).tolist()
                    continue
                queue = queues[int(c)]
                if len(queue) < self.k:  # refill without repeating an image inside this batch
                    pending = set(queue)
                    queue += [i for i in rng.permutation(members).tolist() if i not in pending]
                batch += queue[: self.k]
                del queue[: self.k]
            yield batch


class DistributedPKBatchSampler(PKBatchSampler):
    """One process's share of each global P×K batch, for training with ``torchrun``.

    Every rank draws the same global batches (same ``labels``, ``seed`` and epoch, so call
    :meth:`set_epoch` on every rank alike) and keeps every ``world_size``-th image of each:
    ``batch[rank::world_size]``. As a global batch is laid out class by class, a rank holds
    K/world_size images of each of the P classes when ``world_size`` divides K (all classes on
    every rank keeps per-rank BatchNorm statistics close to the global ones). The ranks' shares
    are disjoint positions of the global batch and, concatenated in rank order (what
    ``all_gather`` gives), are the global batch itself, reordered. ``rank`` and ``world_size``
    default to those of the initialised ``torch.distributed`` process group.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__(labels, p, k, seed=seed, batches_per_epoch=batches_per_epoch)
        if rank is None or world_size is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("pass rank and world_size, or initialise torch.distributed first")
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if (p * k) % world_size:
            raise ValueError(
                f"a P×K batch of {p}×{k}={p * k} images does not split evenly over {world_size} processes; "
                f"choose k (or p) so that {world_size} divides p·k, e.g. k={-(-k // world_size) * world_size}"
            )
        self.rank, self.world_size = rank, world_size

    def global_batches(self) -> Iterator[list[int]]:
        """The global P×K batches of the current epoch (the same on every rank)."""
        return super().__iter__()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world_size]
