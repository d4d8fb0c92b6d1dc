"""Data-parallel training with ``torchrun``: one process per device (or per CPU share), one model.

    torchrun --standalone --nproc_per_node=2 -m fashsim train --epochs 20     # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m fashsim train     # 2 machines × 8 GPUs

:func:`fashsim.train.train` sees torchrun's ``RANK``/``WORLD_SIZE`` and runs its loop through
:class:`DistributedRun` instead of the single-process run; nothing else changes for the caller.

**The global batch.** Every rank draws the same global P×K batch (same seed, same epoch) and
embeds its share, every ``world_size``-th image (:class:`~fashsim.data.sampler.DistributedPKBatchSampler`:
K/world_size images of each of the P classes). :func:`gather_with_grad` concatenates the
embeddings of all ranks, so :func:`~fashsim.train.objective.compute_loss`, unchanged, mines the
hardest positive and negative of each anchor among the *global* batch. Its backward pass sums,
for each rank's embeddings, the gradients that every rank's (identical) loss sends them — ``world_size``
times the gradient of the loss — and DDP then *averages* the parameter gradients over the ranks:
the update is exactly that of one process on the global batch, with no loss scaling. (A gather
whose other ranks' slots carry no gradient, as pytorch-metric-learning's ``DistributedLossWrapper``
does, needs the loss multiplied by ``world_size`` instead.)

**BatchNorm** statistics are those of the global batch as well: the network's BatchNorm layers
become :class:`torch.nn.SyncBatchNorm` on CUDA and :class:`GlobalBatchNorm` on CPUs (torch's
SyncBatchNorm refuses CPU tensors), so a distributed step equals a single-process step on the
same batch (``tests/test_distributed.py`` checks it). BatchNorm subclasses with extra behaviour
(timm's ``BatchNormAct2d``) keep per-rank statistics, with a warning.

**Files.** Rank 0 alone validates (the others receive its metrics, so early stopping and the time
budget decide alike everywhere), writes checkpoints, history and the model. On resume rank 0
reads its checkpoint and sends it to every rank, so a run killed on any rank restarts from rank
0's last checkpoint, also on machines that do not share ``out_dir``.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import io
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..data.sampler import DistributedPKBatchSampler
from ..errors import FashsimError
from .loop import CHECKPOINT, _Run
from .objective import Batch, compute_loss

#: torchrun's environment variables (``LOCAL_*``: within one machine).
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------ the process group
def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_active() -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wants_distributed(distributed: bool | None) -> bool:
    """``distributed`` as :func:`fashsim.train.train` reads it: None means "if launched so"."""
    if distributed is None:
        return launched_by_torchrun() or is_active()
    return bool(distributed)


def local_rank() -> int:
    """This process's rank on its machine under torchrun (0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine under torchrun (1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def uses_cuda(device: str) -> bool:
    """Whether ``device`` (``cpu``, ``cuda`` or ``auto``) trains on CUDA here."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def init_process_group(device: str = "auto") -> None:
    """Join torchrun's process group, unless one is up already: NCCL when training on CUDA (one
    GPU per local rank), gloo on CPUs. It stays up for the life of the process (later
    :func:`~fashsim.train.train` calls reuse it: re-creating a group under torchrun races with
    the stale rendezvous of the old one) and is closed at exit."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise FashsimError(
            "distributed training needs the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR ...): launch "
            "with `torchrun --nproc_per_node=N ...`, or initialise torch.distributed yourself first"
        )
    if uses_cuda(device):
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    atexit.register(_close_process_group)


#: seconds a rank waits at exit for the others before it tears the process group down anyway.
EXIT_BARRIER_SECONDS = 10


def _close_process_group() -> None:
    """At exit: wait (gloo) until every rank got here, then close the group. Closing gloo while another
    rank still tears its own down aborted one run in ten of a two-process test ("terminate called
    without an active exception", after all work was saved). A rank that failed does not wait for
    the others longer than :data:`EXIT_BARRIER_SECONDS`."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":  # (NCCL has no barrier with a timeout: closed as before)
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_SECONDS))
        except Exception:  # noqa: BLE001 - another rank is gone or failed: close ours regardless
            pass
    dist.destroy_process_group()


def run_class(distributed: bool | None, device: str = "auto") -> type[_Run]:
    """The run class :func:`fashsim.train.train` uses: ``_Run`` in one process, or
    :class:`DistributedRun` (after joining the process group) under torchrun or when asked."""
    if not wants_distributed(distributed):
        return _Run
    init_process_group(device)
    return DistributedRun


# ------------------------------------------------------------------ collectives
def _collective_device() -> torch.device:
    """Where small tensors for a collective live: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' tensors concatenated along dim 0; backward: this rank's slice of the sum of
    every rank's gradient (an all-reduce), so each rank's loss reaches the embeddings it used."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` of the same-shaped ``tensor`` of every rank, in rank order, differentiable
    (see :class:`_GatherWithGrad` and the module docstring for the gradient's scale)."""
    return _GatherWithGrad.apply(tensor) if is_active() else tensor


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` of every rank's ``tensor`` (same shape everywhere), without gradient."""
    if not is_active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks (the same number everywhere)."""
    if not is_active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


# ------------------------------------------------------------------ BatchNorm over the global batch
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that normalises with the statistics of the global batch in training mode, on
    any device and backend (gloo included): every rank's per-channel count, mean and sum of
    squared deviations are gathered (with gradient) and combined (Chan et al.'s parallel
    variance), so the output, the gradients and the running statistics equal those of one
    BatchNorm over the concatenated batch. Alone, or in eval mode, it is a plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input (N, C, ...), got {input.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        count = xf.numel() // xf.shape[1]
        mean = xf.mean(dims)
        m2 = (xf - mean.view(shape)).square().sum(dims)
        ranks = gather_with_grad(torch.cat([mean, m2, mean.new_full((1,), float(count))])[None])
        channels = len(mean)
        means, m2s, counts = ranks[:, :channels], ranks[:, channels : 2 * channels], ranks[:, -1:].detach()
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - global_mean).square()).sum(0) / total  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(global_mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * total / (total - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - global_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


#: DDP's switch for copying rank 0's buffers before each forward (renamed in torch 2.13).
_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)

PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> tuple[int, set[str]]:
    """Replace, in place, every plain BatchNorm of ``module`` by a global-batch one
    (:class:`torch.nn.SyncBatchNorm` on CUDA, :class:`GlobalBatchNorm` elsewhere) that shares its
    parameters and buffers (an optimiser made before keeps working; the state dict keeps its
    keys). Returns how many were replaced and the type names of the BatchNorm subclasses left
    with per-rank statistics (warned)."""
    new_class = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    replaced, kept = 0, set()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in PLAIN_BATCHNORMS:
                bn = new_class(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                if child.affine:
                    bn.weight, bn.bias = child.weight, child.bias
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(bn, buffer, getattr(child, buffer))
                setattr(parent, name, bn.train(child.training))
                replaced += 1
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, (GlobalBatchNorm, nn.SyncBatchNorm)
            ):
                kept.add(type(child).__name__)
    if kept:
        warnings.warn(
            f"BatchNorm layers of type {', '.join(sorted(kept))} keep per-rank batch statistics", stacklevel=2
        )
    return replaced, kept


# ------------------------------------------------------------------ the run
class _LocalEmbedder(nn.Module):
    """What DDP wraps: this rank's inputs → embeddings before normalisation (through the head
    alone on cached backbone features)."""

    def __init__(self, net: nn.Module, head_only: bool) -> None:
        super().__init__()
        self.net, self.head_only = net, head_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(x) if self.head_only else self.net.raw_embedding(x)


class _GlobalBatchModel:
    """The model as :func:`compute_loss` sees it under DDP: ``raw_embedding`` (or ``head``) runs
    this rank's inputs through DDP and returns the embeddings of the whole global batch."""

    def __init__(self, ddp: DistributedDataParallel, classifier: nn.Module | None) -> None:
        self.ddp, self.classifier = ddp, classifier

    def raw_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(self.ddp(x))

    head = raw_embedding


class DistributedRun(_Run):
    """:class:`fashsim.train.loop._Run` for one rank of a ``torchrun`` job (see the module docstring)."""

    def __init__(self, config, train_data, val_data, out_dir, *, progress: bool, feature_cache) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if uses_cuda(config.device):
            torch.cuda.set_device(local_rank())
        if not self.is_main:  # rank 0 first: it downloads weights and caches backbone features for all
            dist.barrier()
        super().__init__(
            config, train_data, val_data, out_dir, progress=progress and self.is_main, feature_cache=feature_cache
        )
        if self.is_main:
            dist.barrier()
        if self.device.type == "cpu":  # the machine's cores shared among its processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
        if self.batch_size % self.world_size:
            raise FashsimError(
                f"a batch of {self.batch_size} images does not split over {self.world_size} "
                "processes; choose k (or p) so that the process count divides p·k"
            )
        if config.loss != "cross_entropy":
            self.sampler = DistributedPKBatchSampler(
                train_data.labels,
                p=self.sampler.p,
                k=config.k,
                rank=self.rank,
                world_size=self.world_size,
                seed=config.seed,
            )
        _, per_rank = synchronise_batchnorm(self.model, self.device)
        # running statistics agree by construction once every BatchNorm is global; else rank 0's are copied each step
        self.ddp = DistributedDataParallel(
            _LocalEmbedder(self.model, config.freeze_backbone),
            device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None,
            **{_BUFFER_SYNC: bool(per_rank)},
        )
        self.global_model = _GlobalBatchModel(self.ddp, self.model.classifier)

    def checkpoint_source(self):
        path = self.out_dir / CHECKPOINT
        blob = path.read_bytes() if self.is_main and path.is_file() else None
        blob = broadcast_object(blob)  # rank 0's checkpoint, whatever the other ranks have on disk
        return None if blob is None else io.BytesIO(blob)

    def batches(self, epoch: int):
        batches = super().batches(epoch)
        if self.config.loss == "cross_entropy":  # the same shuffled global batches everywhere: take this rank's share
            return (indices[self.rank :: self.world_size] for indices in batches)
        return batches

    def loss(self, batch: Batch):
        """:func:`compute_loss` of the global batch: this rank's images through DDP, every rank's
        embeddings and labels gathered (in rank order)."""
        return compute_loss(self.config, self.global_model, Batch(batch.inputs, gather(batch.labels)), self.state.step)

    def step(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        """One step; then the ranks agree on the clock (a collective that, with NCCL, also waits for
        this rank's GPU at every step: the one-process loop's batched statistics do not help here)."""
        stats = super().step(batch, progress)
        self.state.elapsed = max_over_ranks(self.state.elapsed)  # one clock: every rank stops at the same step
        return stats

    def validate(self) -> dict[str, float]:
        return broadcast_object(super().validate() if self.is_main else None)

    def result(self, stopped: str):
        dist.barrier()  # rank 0 has written the last model
        return super().result(stopped)


def global_batch_order(batch: list[int], world_size: int) -> list[int]:
    """The global batch in the order the gathered embeddings have it: rank 0's share, rank 1's ..."""
    return [i for rank in range(world_size) for i in batch[rank::world_size]]
