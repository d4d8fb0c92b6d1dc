"""The training loop: triplet loss with online mining on P×K batches (and a cross-entropy baseline).

:func:`train` runs it with everything a real run needs: device auto-selection (CUDA with float16
mixed precision; CPU with all cores, in bfloat16 where the CPU has it natively), a tqdm progress
bar, validation Recall@1 / MAP@R and an atomic checkpoint after every epoch (every ``val_every``
epochs, and after the last) with **resume** from it after an interruption, early stopping, a
wall-clock budget, fixed seeds, a collapse watch, and a JSON history (loss, mining statistics,
metrics, throughput per epoch).

On a GPU the loop avoids waiting for the device: an epoch's batch indices and augmentation draws go
to the GPU in one copy, and the batch statistics are read every
:data:`STATS_EVERY_ON_ACCELERATOR` steps, not after each one. The time budget counts the
optimisation steps (batch preparation, validation and checkpoints excluded: 1–2 % of an epoch on a
CPU, up to a fifth on a GPU, where the steps are short).

The learning rate follows a linear warm-up then a cosine decay over the run's *progress*, which is
the larger of the share of epochs done and the share of the time budget used — so a run cut by
its budget still ends with an annealed learning rate. The loss of one batch is
:func:`fashsim.train.objective.compute_loss`.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set, or ``distributed=True``) the same loop runs in
every process through :class:`fashsim.train.distributed.DistributedRun` (DDP, a share of each
global P×K batch per rank, mining over the gathered global batch, rank 0 alone writing); the
marked ``DDP hook`` lines are the points it overrides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.datasets import ImageArrayDataset
from ..data.sampler import PKBatchSampler
from ..data.transforms import AUGMENT_DRAWS, augment_batch, augment_draws, normalise_batch
from ..errors import FashsimError
from ..evaluation.metrics import retrieval_metrics
from ..fileio import atomic_write_bytes, folder_lock
from ..model.inference import cached_features, embed_arrays
from ..model.input_format import training_input_spec
from ..model.networks import EmbeddingNet
from ..model.persistence import load_model, save_model
from ..paths import data_dir
from .checkpoints import CheckpointMismatchError, restore_checkpoint, save_checkpoint, set_aside
from .config import TrainConfig
from .device import autocast_dtype, seed_everything, select_device
from .objective import Batch, compute_loss, stats_to_floats

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
HISTORY = "history.json"
TRAIN_BUSY_ADVICE = "wait for it to finish, or train into another folder (--out, out_dir)"
RUN_FILES = (CHECKPOINT, BEST_MODEL, HISTORY)  # what a run writes in its folder
#: steps between reads of the batch statistics on an accelerator (each read waits for the device)
STATS_EVERY_ON_ACCELERATOR = 25


class TrainingCollapsedWarning(UserWarning):
    """The embeddings collapsed: every image maps to (nearly) the same point."""


class CollapseMonitor:
    """Flags a collapse when the mean pairwise distance of a batch's (unit) embeddings stays below
    ``threshold`` for ``patience`` consecutive steps; :meth:`update` returns True once per episode."""

    def __init__(self, threshold: float = 0.05, patience: int = 25) -> None:
        self.threshold, self.patience, self.low_steps = threshold, patience, 0

    def update(self, spread: float) -> bool:
        """Record one step's embedding spread; True on the step the collapse is declared."""
        self.low_steps = self.low_steps + 1 if spread < self.threshold else 0
        return self.low_steps == self.patience


@dataclass
class TrainState:
    """What the loop carries from step to step and epoch to epoch (saved in every checkpoint)."""

    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0  # optimisation seconds used (validation excluded)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    bad_epochs: int = 0
    collapse_steps: list[int] = field(default_factory=list)


@dataclass
class TrainResult:
    """What :func:`train` returns: the best model, the per-epoch history, the best epoch's record,
    where it was saved and why it stopped."""

    model: EmbeddingNet
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    out_dir: Path | None = None
    stopped: str = "epochs"


def lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 as ``progress`` goes 0 → 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    config: TrainConfig,
    train_data: ImageArrayDataset,
    val_data: ImageArrayDataset,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    feature_cache: str | os.PathLike | None = None,
    distributed: bool | None = None,
) -> TrainResult:
    """Train an :class:`EmbeddingNet` on in-memory images; checkpoints and history go to ``out_dir``.

    With ``resume=True`` and a checkpoint of the same configuration and data in ``out_dir``,
    training continues after the last completed epoch (and within the remaining time budget); a
    run of another configuration or on other data there (and any run, with ``resume=False``) is
    moved to ``out_dir/superseded/<time>/`` and training starts afresh. With
    ``config.freeze_backbone`` only the head trains, on backbone features cached in
    ``feature_cache`` (default ``data/cache/features``; see :mod:`fashsim.model.inference`).
    While another process trains into ``out_dir``, a run there raises
    :class:`~fashsim.errors.FolderInUseError` before it touches anything.

    ``distributed``: None (default) trains with DDP when launched by ``torchrun`` with more than
    one process, True always does (torchrun's variables or an initialised process group needed),
    False never does (see :mod:`fashsim.train.distributed`).
    """
    from .distributed import run_class

    Run = run_class(distributed, config.device)  # DDP hook: _Run, or DistributedRun under torchrun
    run = Run(config, train_data, val_data, Path(out_dir), progress=progress, feature_cache=feature_cache)
    claim = folder_lock(out_dir, "training run", TRAIN_BUSY_ADVICE) if run.is_main else contextlib.nullcontext()
    with claim:  # two runs in one folder would overwrite each other's checkpoints
        if resume:
            run.resume()
        elif run.is_main:
            set_aside(out_dir, RUN_FILES, "resume=False")
        stopped = "epochs"
        for epoch in range(run.state.epoch, config.epochs):
            if run.out_of_time():
                stopped = "time budget"
                break
            run.train_epoch(epoch)
            if run.out_of_time():
                stopped = "time budget"
                break
            if config.patience is not None and run.state.bad_epochs >= config.patience:
                stopped = "early stopping"
                break
        return run.result(stopped)


class _Run:
    """One training run's objects: model, optimiser, inputs, sampler, state; :func:`train` drives it."""

    is_main = True  # DDP hook: the process that validates and writes files (rank 0 under torchrun)

    def __init__(
        self,
        config: TrainConfig,
        train_data: ImageArrayDataset,
        val_data: ImageArrayDataset,
        out_dir: Path,
        *,
        progress: bool,
        feature_cache,
    ) -> None:
        _check_images(train_data)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.config, self.out_dir, self.progress = config, out_dir, progress
        self.device = select_device(config.device)
        self.precision = autocast_dtype(config, self.device)
        seed_everything(config.seed)
        self.spec = training_input_spec(config, train_data.images)
        weights = None if config.resolved_weights == "random" else config.resolved_weights
        classes = len(train_data.class_names) if (config.loss == "cross_entropy" or config.ce_weight > 0) else 0
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = EmbeddingNet(
            config.backbone,
            embedding_dim=config.embedding_dim,
            in_channels=self.spec.channels,
            weights=weights,
            input_spec=self.spec,
            num_classes=classes,
            multi_scale=config.multi_scale,
            flip_average=config.flip_average,
        )
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        if config.freeze_backbone:
            self.model.backbone.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, weight_decay=config.weight_decay, fused=self.device.type == "cuda" or None
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision is torch.float16)  # bf16 needs no scaling
        self.generator = torch.Generator().manual_seed(config.seed)
        self.state = TrainState()
        self.labels = torch.from_numpy(train_data.labels).to(self.device)
        p = min(config.p, len(np.unique(train_data.labels)))  # e.g. open-set training sees fewer classes
        self.sampler = PKBatchSampler(train_data.labels, p=p, k=config.k, seed=config.seed)
        self.batch_size = p * config.k
        self.val = _validation_subset(val_data, config.val_max_items, config.seed)
        self.data_key = train_data.fingerprint() + self.val.fingerprint()
        if config.freeze_backbone:  # the backbone sees every image once; the head trains on its cached features
            cache = Path(feature_cache) if feature_cache else data_dir() / "cache" / "features"
            self.inputs, self.val_features = (
                torch.from_numpy(
                    cached_features(
                        self.model.backbone, data.images, self.spec, cache, device=self.device, progress=progress
                    )
                ).to(self.device)
                for data in (train_data, self.val)
            )
        else:
            self.inputs = torch.from_numpy(np.ascontiguousarray(train_data.images)).to(self.device)
        self.monitor = CollapseMonitor()

    def checkpoint_source(self):
        """The folder's checkpoint to resume from, None when there is none (DDP hook: rank 0's, broadcast)."""
        path = self.out_dir / CHECKPOINT
        return path if path.is_file() else None

    def resume(self) -> None:
        """Continue from the folder's checkpoint when it is this run's; set another run's aside."""
        source = self.checkpoint_source()
        if source is None:  # a model or history without a checkpoint (deleted, or never written): not overwritten
            if self.is_main:
                set_aside(
                    self.out_dir, RUN_FILES, f"{self.out_dir} holds an earlier run's files but no checkpoint of it"
                )
            return
        try:
            saved = restore_checkpoint(
                source, self.config, self.model, self.optimizer, self.scaler, self.generator, data_key=self.data_key
            )
        except CheckpointMismatchError as mismatch:
            if self.is_main:
                set_aside(self.out_dir, RUN_FILES, f"{self.out_dir} holds a run made with {mismatch}")
            return
        self.state = TrainState(**saved)
        if self.is_main:
            print(
                f"resuming from {self.out_dir / CHECKPOINT}: epoch {self.state.epoch} done, "
                f"{self.state.elapsed:.0f} s used",
                flush=True,
            )

    def out_of_time(self) -> bool:
        return self.config.max_seconds is not None and self.state.elapsed >= self.config.max_seconds

    def batches(self, epoch: int):
        """P×K batches for the metric losses; plain shuffled batches of the same size for cross-entropy."""
        if self.config.loss != "cross_entropy":
            self.sampler.set_epoch(epoch)
            return iter(self.sampler)
        order = torch.randperm(len(self.labels), generator=self.generator)
        size = self.batch_size
        return (order[i : i + size].tolist() for i in range(0, len(order) - size + 1, size))

    def epoch_batches(self, epoch: int) -> list[tuple]:
        """This epoch's batches as ``(indices, augmentation draws)``, each moved to the device in one
        copy for the whole epoch (a copy per step would make every step wait for the device)."""
        batches = [list(b) for b in self.batches(epoch)]
        if not batches:
            return []
        index = torch.as_tensor(np.asarray(batches), device=self.device)  # (steps, B): batches are all full
        draws = [None] * len(batches)
        if self.config.augment and not self.config.freeze_backbone:
            draws = augment_draws(index.numel(), self.generator).view(*index.shape, len(AUGMENT_DRAWS))
            draws = draws.to(self.device)
        return list(zip(index, draws))

    def make_batch(self, indices, draws=None) -> Batch:
        """The model inputs and labels of the images ``indices``, augmented with ``draws`` (see
        :func:`fashsim.data.transforms.augment_draws`; drawn from the run's generator when None)."""
        index = torch.as_tensor(indices, device=self.device)
        x = self.inputs[index]
        if not self.config.freeze_backbone:
            x = normalise_batch(x, self.spec)
            if self.config.augment:
                x = augment_batch(
                    x,
                    self.generator,
                    draws=draws,
                    max_shift=self.config.augment_shift,
                    erase=self.config.augment_erase,
                )
            x = x.contiguous(memory_format=self.memory_format)
        return Batch(x, self.labels[index])

    def progress_at(self, epoch: int, seen: int) -> float:
        by_epochs = (epoch + seen / (len(self.sampler) * self.batch_size)) / self.config.epochs
        by_time = self.state.elapsed / self.config.max_seconds if self.config.max_seconds else 0.0
        return max(by_epochs, by_time)

    def step(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the batch's statistics as 0-d tensors on the device
        (:meth:`read_stats` turns them into numbers)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(self.state.step, progress, self.config.lr_warmup_steps)
        start = time.perf_counter()
        with torch.autocast(
            self.device.type, dtype=self.precision or torch.float32, enabled=self.precision is not None
        ):
            loss, stats = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        self.state.elapsed += time.perf_counter() - start
        return stats

    def read_stats(self, pending: list[dict], sums: dict[str, float]) -> dict[str, float]:
        """Read the statistics of the ``pending`` steps (the last ones taken) in one transfer, add them
        to ``sums`` and watch them for a collapse; returns the last step's."""
        if not pending:
            return {}
        keys = [list(stats) for stats in pending]
        flat = stats_to_floats({f"{i}/{k}": v for i, stats in enumerate(pending) for k, v in stats.items()})
        first_step = self.state.step - len(pending) + 1
        values = {}
        for i, names in enumerate(keys):
            values = {k: flat[f"{i}/{k}"] for k in names}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if self.monitor.update(values["spread"]):
                self.state.collapse_steps.append(first_step + i)
                warnings.warn(
                    f"COLLAPSE: for {self.monitor.patience} steps the embeddings of a batch lie on average "
                    f"{values['spread']:.3f} apart (unit vectors: 1.41 when spread out) at step "
                    f"{first_step + i}: lower the learning rate, warm up with batch_all mining, or use a "
                    "soft margin",
                    TrainingCollapsedWarning,
                    stacklevel=3,
                )
        return values

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and statistics (DDP hook: the global batch's under torchrun)."""
        return compute_loss(self.config, self.model, batch, self.state.step)

    def train_epoch(self, epoch: int) -> None:
        """Train one epoch (or until the budget runs out), then record it (validating and saving
        every ``val_every`` epochs)."""
        self.model.train()
        if self.config.freeze_backbone:
            self.model.backbone.eval()  # frozen BatchNorm statistics too
        sums: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        read_every = 1 if self.device.type == "cpu" else STATS_EVERY_ON_ACCELERATOR
        pending: list[dict] = []
        bar = tqdm(
            total=len(self.sampler),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            disable=not self.progress,
            leave=False,
        )
        for indices, draws in self.epoch_batches(epoch):
            pending.append(self.step(self.make_batch(indices, draws), self.progress_at(epoch, seen)))
            seen += self.batch_size  # DDP hook: the global batch (a rank holds a share of it); batches are full
            out_of_time = self.out_of_time()
            if len(pending) >= read_every or out_of_time:
                last = self.read_stats(pending, sums)
                bar.update(len(pending))
                bar.set_postfix(loss=f"{last['loss']:.3f}", spread=f"{last['spread']:.2f}")
                pending = []
            if out_of_time:
                break
        self.read_stats(pending, sums)
        bar.close()
        self.end_epoch(epoch, seen, sums, time.perf_counter() - start)

    def validate(self) -> dict[str, float]:
        if self.config.freeze_backbone:
            self.model.eval()
            with torch.inference_mode():
                embeddings = F.normalize(self.model.head(self.val_features).float(), dim=1).cpu().numpy()
        else:
            embeddings = embed_arrays(self.model, self.val.images, device=self.device)
        return retrieval_metrics(embeddings, self.val.labels, ks=(1, 5))

    def validation_due(self, epoch: int) -> bool:
        """Every ``val_every`` epochs, and after the run's last epoch (its budget or epochs used up)."""
        done = epoch + 1 >= self.config.epochs or self.out_of_time()
        return done or (epoch + 1) % self.config.val_every == 0

    def end_epoch(self, epoch: int, seen: int, sums: dict[str, float], wall: float) -> None:
        steps = max(1, math.ceil(seen / self.batch_size))
        record = {
            "epoch": epoch + 1,
            "steps": self.state.step,
            "images": seen,
            "images_per_second": seen / wall if wall > 0 else 0.0,
            "train_seconds": self.state.elapsed,
            "lr": self.optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v / steps for k, v in sums.items()},
        }
        state = self.state
        state.history.append(record)
        validated = self.validation_due(epoch)
        metrics, improved = None, False
        if validated:
            start = time.perf_counter()
            metrics = self.validate()
            record |= {f"val_{k}": metrics[k] for k in ("recall@1", "recall@5", "map@r")}
            record["validation_seconds"] = time.perf_counter() - start
            improved = record["val_map@r"] > state.best.get("val_map@r", -1.0)
            if improved:
                state.best, state.bad_epochs = dict(record), 0
            else:
                state.bad_epochs += 1
        state.epoch = epoch + 1
        if self.is_main:  # DDP hook: rank 0 alone writes
            self.save_epoch(record, metrics, improved)

    def save_epoch(self, record: dict, metrics: dict[str, float] | None, improved: bool) -> None:
        """The history, and after a validation (``metrics``) the best model (when ``improved``) and the
        checkpoint; then a line of progress."""
        state, epoch = self.state, record["epoch"] - 1
        if improved:
            save_model(
                self.model,
                self.out_dir / BEST_MODEL,
                train_config=self.config.to_dict(),
                epoch=epoch + 1,
                val_metrics={k: v for k, v in record.items() if k.startswith("val_")},
            )
        if metrics is not None:
            save_checkpoint(
                self.out_dir / CHECKPOINT,
                self.config,
                self.model,
                self.optimizer,
                self.scaler,
                self.generator,
                asdict(state),
                data_key=self.data_key,
            )
        precision = str(self.precision or torch.float32).removeprefix("torch.")
        atomic_write_bytes(
            self.out_dir / HISTORY,
            json.dumps(
                {
                    "config": self.config.to_dict(),
                    "device": str(self.device),
                    "amp": self.precision is not None,
                    "precision": precision,
                    "history": state.history,
                    "best": state.best,
                    "collapse_steps": state.collapse_steps,
                },
                indent=2,
            ).encode(),
        )
        scores = f"  val R@1 {metrics['recall@1']:.4f}  MAP@R {metrics['map@r']:.4f}" if metrics else ""
        print(
            f"epoch {epoch + 1}: loss {record.get('train_loss', float('nan')):.4f}{scores}  "
            f"{record['images_per_second']:.0f} img/s" + ("  *best*" if improved else ""),
            flush=True,
        )

    def result(self, stopped: str) -> TrainResult:
        best = self.out_dir / BEST_MODEL
        model = load_model(best, device=self.device) if best.is_file() else self.model.eval()
        return TrainResult(model, self.state.history, self.state.best, self.out_dir, stopped)


def _check_images(data: ImageArrayDataset) -> None:
    images = data.images
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise FashsimError(
            "train() takes uint8 images held in memory: greyscale (N, H, W) such as Fashion-MNIST, "
            "or RGB (N, H, W, 3) such as fashsim.data.catalogs.load_catalog_images gives for a photo "
            "catalog"
        )


def _validation_subset(val: ImageArrayDataset, max_items: int | None, seed: int) -> ImageArrayDataset:
    if max_items is None or len(val) <= max_items:
        return val
    rng = np.random.default_rng(seed)
    return val.subset(np.sort(rng.choice(len(val), max_items, replace=False)))
