"""Training for photo catalogs (:mod:`fashsim.app.shop`): a triplet embedding on "the same style"
with batch-hard mining, plus a cross-entropy head per label column (multi-task), for a
wall-clock budget, resumable.

Three inputs, one loop:

* **cached backbone features** (a frozen pretrained backbone, the CPU path): only the head
  (projection + BN-neck) trains; the features are standardised during training and the
  standardisation is folded into the projection afterwards, so the saved model takes raw
  backbone features like any :class:`~fashsim.model.networks.EmbeddingNet`;
* **images in the model's input format**, in memory (a small CNN from scratch at low
  resolution): the whole network trains, with flips and small shifts as augmentation (never
  colour jitter: colour is what the shop searches by);
* **image files** (:class:`~fashsim.data.catalogs.CatalogImages`: a pretrained backbone
  fine-tuned, the GPU path): the whole network trains as above, each P×K batch decoded from disk
  by ``DataLoader`` workers (the catalog is never in memory), the backbone at
  ``backbone_lr_scale`` × the head's learning rate, its BatchNorm statistics kept as pretrained
  and the classifiers carried over from the head's training (``heads_from``), so that fine-tuning
  starts from the model the head's phase made rather than pulling at it.

On a GPU (``device``) the forward pass runs in float16 with a gradient scaler; on a CPU in
bfloat16 where the CPU computes it natively, else in float32.

A checkpoint is written every :data:`CHECKPOINT_SECONDS` of wall time and at the end; a run
interrupted and started again with the same data and configuration continues where it stopped
(within the remaining budget), and a finished one is not trained again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.catalogs import CatalogImages, collate_catalog_batch
from ..data.datasets import update_digest
from ..data.sampler import PKBatchSampler
from ..data.transforms import augment_batch, normalise_batch
from ..fileio import atomic_torch_save
from ..model.networks import EmbeddingNet
from ..train.device import autocast_dtype
from ..train.loop import lr_factor
from ..train.losses import triplet_loss


@dataclass
class ShopTrainConfig:
    """How the shop model trains (see the module docstring)."""

    seconds: float = 60.0  # wall-clock budget of the optimisation
    max_epochs: int = 500
    p: int = 32  # styles per batch (capped at the number of styles)
    k: int = 8  # images per style
    lr: float = 1e-3
    weight_decay: float = 5e-4
    margin: float = 0.2
    mining: str = "batch_hard"
    ce_weight: float = 0.5  # cross-entropy per label column, on the BN-neck output (0: triplet only)
    feature_dropout: float = 0.2  # frozen features only
    augment: bool = True  # images only: flips and 2-px shifts (the border repeats the background)
    amp: bool = True  # images only: the forward pass in float16 on a GPU, bfloat16 where the CPU computes it natively
    backbone_lr_scale: float = 0.1  # image files (fine-tuning): the pretrained backbone learns at this × lr
    warmup_steps: int = 50
    seed: int = 0
    threads: int | None = None  # torch CPU threads while training (None: 1 for a head, auto_threads() for a CNN)
    workers: int = 2  # image files only: DataLoader processes decoding the batches

    def to_dict(self) -> dict:
        """Every setting by name (saved with the checkpoint)."""
        return asdict(self)


_RESUMABLE = {"seconds", "max_epochs", "threads", "workers"}
#: how often an unfinished training is saved (a run killed sooner starts again from its beginning)
CHECKPOINT_SECONDS = 20.0


def auto_threads() -> int:
    """Every core on an idle machine, one on a busy one: when other processes keep the cores busy
    (at least cores − 0.5 of them, :func:`busy_cores`), several torch threads wait on each other
    at every step — measured 10× slower than one thread on a shared two-core machine."""
    cores = os.cpu_count() or 1
    return 1 if busy_cores() >= cores - 0.5 else cores


def busy_cores(window: float = 0.3) -> float:
    """How many cores other processes keep busy now: measured over ``window`` seconds from
    ``/proc/stat`` (Linux), less this process's own CPU time. Elsewhere the 1-minute load
    average, which also counts this process's recent work and lags by about a minute (0 where
    there is none)."""
    try:
        busy_before, own_before, start = _busy_seconds(), time.process_time(), time.monotonic()
        time.sleep(window)
        busy = _busy_seconds() - busy_before - (time.process_time() - own_before)
        return max(0.0, busy / (time.monotonic() - start))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:  # not available on this platform
            return 0.0


def _busy_seconds() -> float:
    """CPU seconds spent busy (user, nice, system, irq, softirq, steal) on all cores since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch CPU threads; the previous number is restored after it,
    also when it fails."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _data_key(inputs, style: np.ndarray, aux: Mapping[str, np.ndarray], config: ShopTrainConfig) -> str:
    digest = hashlib.sha256(
        json.dumps({k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}, sort_keys=True).encode()
    )
    if isinstance(inputs, CatalogImages):  # image files: which files, in which format
        digest.update(json.dumps([inputs.paths, inputs.spec.to_dict()], sort_keys=True).encode())
    else:
        update_digest(digest, inputs)
    update_digest(digest, style)
    for name in sorted(aux):
        digest.update(name.encode())
        update_digest(digest, aux[name])
    return digest.hexdigest()[:20]


def fold_standardisation(projection: nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """Make ``projection(x)`` equal what it computed on ``(x - mean) / std``: ``W' = W / std``,
    ``b' = b - W' · mean`` (in place)."""
    with torch.no_grad():
        mean_t = torch.as_tensor(mean, dtype=projection.weight.dtype)
        std_t = torch.as_tensor(std, dtype=projection.weight.dtype)
        projection.weight.div_(std_t[None, :])
        projection.bias.sub_(projection.weight @ mean_t)


def train_shop_model(
    model: EmbeddingNet,
    inputs: np.ndarray | CatalogImages,
    style: np.ndarray,
    aux: Mapping[str, np.ndarray],
    *,
    frozen: bool,
    config: ShopTrainConfig,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    heads_from: str | os.PathLike | None = None,
) -> dict:
    """Train ``model`` in place on ``inputs`` — backbone features ``(N, F)`` when ``frozen``, else
    uint8 images ``(N, H, W, 3)`` in ``model.input_spec`` or the image files of a
    :class:`~fashsim.data.catalogs.CatalogImages` — with batch-hard triplets on ``style`` (int
    labels) plus ``config.ce_weight`` × cross-entropy on each ``aux`` label array, on ``device``.
    ``heads_from``: a finished run's checkpoint whose cross-entropy heads this run starts from (a
    fine-tuning after the head's training: no random classifier pulls at the pretrained backbone).
    Returns a summary (steps, epochs, seconds, last losses, whether it resumed, precision)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    files = isinstance(inputs, CatalogImages)
    if frozen and files:
        raise ValueError("a frozen backbone trains on its cached features, not on image files")
    style = np.asarray(style, np.int64)
    aux = {name: np.asarray(values, np.int64) for name, values in aux.items() if len(np.unique(values)) > 1}
    threads = config.threads or (1 if frozen else auto_threads())
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    with torch_threads(threads):
        n_styles = len(np.unique(style))
        p = max(2, min(config.p, n_styles))
        sampler = PKBatchSampler(style, p=p, k=config.k, seed=config.seed)
        heads = nn.ModuleDict(
            {name: nn.Linear(model.embedding_dim, int(values.max()) + 1) for name, values in aux.items()}
        ).to(device)
        if heads_from is not None:
            heads.load_state_dict(torch.load(heads_from, map_location="cpu", weights_only=False)["heads"])
        model.to(device)
        # the head: projection + BN-neck (every parameter outside the backbone)
        groups = [{"params": [p for name, p in model.named_parameters() if not name.startswith("backbone.")]}]
        if frozen:
            model.backbone.requires_grad_(False)
            mean = inputs.mean(0).astype(np.float32)
            std = (inputs.std(0) + 1e-4).astype(np.float32)
            x_all = torch.from_numpy((inputs - mean) / std).float().to(device)
        else:
            mean = std = None
            x_all = None if files else torch.from_numpy(np.ascontiguousarray(inputs))
            model.backbone.requires_grad_(True)
            model.to(memory_format=torch.channels_last)
            backbone_lr = config.backbone_lr_scale if files else 1.0  # fine-tuning: the pretrained part slower
            groups.insert(0, {"params": list(model.backbone.parameters()), "lr_scale": backbone_lr})
        groups.append({"params": list(heads.parameters())})
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        y_style = torch.from_numpy(style).to(device)
        y_aux = {name: torch.from_numpy(values).to(device) for name, values in aux.items()}
        key = _data_key(inputs, style, aux, config)
        state = {"step": 0, "epoch": 0, "elapsed": 0.0, "losses": [], "resumed": False}
        path = Path(checkpoint) if checkpoint else None
        if path is not None and path.is_file():
            blob = torch.load(path, map_location=device, weights_only=False)
            if blob.get("key") == key:
                model.load_state_dict(blob["model"])
                heads.load_state_dict(blob["heads"])
                optimizer.load_state_dict(blob["optimizer"])
                generator.set_state(blob["generator"].cpu())
                state = {**blob["state"], "resumed": True}
                if blob.get("folded"):  # a finished run: its model is already the final one
                    before = blob.get("config", {})
                    longer = [
                        f"{name} {getattr(config, name):g}"
                        for name in ("seconds", "max_epochs")
                        if before.get(name) is not None and getattr(config, name) > before[name]
                    ]
                    if longer:
                        print(
                            f"note: the model in {path.parent} finished its training ({before.get('seconds'):g} s, "
                            f"at most {before.get('max_epochs')} epochs) and is reused as it is; to train it with "
                            f"{' and '.join(longer)}, build afresh (--fresh, resume=False)",
                            flush=True,
                        )
                    return {**state, "threads": threads}
            else:
                print(
                    f"note: the training in {path.parent} was of other items or settings; training afresh "
                    "(its checkpoint is replaced)",
                    flush=True,
                )

        def save(folded: bool = False) -> None:
            if path is not None:
                atomic_torch_save(
                    {
                        "key": key,
                        "model": model.state_dict(),
                        "heads": heads.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(),
                        "state": state,
                        "folded": folded,
                        "config": config.to_dict(),
                    },
                    path,
                )

        def batches():
            """This epoch's P×K batches: ``(row indices, inputs)``, the inputs on ``device``."""
            if not files:
                for batch in sampler:
                    index = torch.as_tensor(batch)
                    yield index.to(device), x_all[index].to(device, non_blocking=True)
                return
            loader = torch.utils.data.DataLoader(
                inputs,
                batch_sampler=sampler,
                num_workers=config.workers,
                collate_fn=collate_catalog_batch,
                pin_memory=device.type == "cuda",
                multiprocessing_context="fork" if config.workers and os.name != "nt" else None,
            )
            for index, images, _ in loader:  # unreadable files were left out before training
                yield torch.from_numpy(index).to(device), torch.from_numpy(images).to(device, non_blocking=True)

        model.train()
        if frozen:
            model.backbone.eval()
        elif files:  # fine-tuning keeps the pretrained BatchNorm statistics the head's phase saw
            for module in model.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        spec = model.input_spec
        # the training loop's rule: float16 with a gradient scaler on a GPU, bfloat16 only where the
        # CPU has it natively (elsewhere emulated: slower than float32); the losses and the
        # optimiser stay in float32
        precision = None if frozen else autocast_dtype(config, device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16)
        state["precision"] = str(precision or torch.float32).removeprefix("torch.")  # kept with a reused model
        state["device"] = device.type
        bar = tqdm(
            total=round(config.seconds),
            initial=min(round(state["elapsed"]), round(config.seconds)),
            desc="fine-tuning (s)" if files else "training (s)",
            disable=not progress,
            leave=False,
        )
        last_save = time.perf_counter()
        done = state["elapsed"] >= config.seconds
        while not done and state["epoch"] < config.max_epochs:
            sampler.set_epoch(state["epoch"])
            start = time.perf_counter()  # the budget counts waiting for a batch too (image files: decoding)
            for index, x in batches():
                progress_now = min(1.0, max(state["elapsed"] / config.seconds, state["epoch"] / config.max_epochs))
                factor = lr_factor(state["step"], progress_now, config.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * group.get("lr_scale", 1.0) * factor
                if frozen:
                    raw = model.head(F.dropout(x, config.feature_dropout))
                else:
                    x = normalise_batch(x, spec)
                    if config.augment:
                        x = augment_batch(x, generator, fill="edge")  # photos: the border repeats the background
                    with torch.autocast(device.type, dtype=precision or torch.bfloat16, enabled=precision is not None):
                        raw = model.raw_embedding(x.contiguous(memory_format=torch.channels_last))
                    raw = raw.float()
                loss = triplet_loss(
                    F.normalize(raw, dim=1), y_style[index], mining=config.mining, margin=config.margin
                ).loss
                for name, head in heads.items():
                    loss = loss + config.ce_weight * F.cross_entropy(head(raw), y_aux[name][index])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                state["step"] += 1
                state["elapsed"] += time.perf_counter() - start
                state["losses"] = (state["losses"] + [round(loss.item(), 4)])[-20:]
                bar.n = min(round(state["elapsed"]), round(config.seconds))
                bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", epoch=state["epoch"] + 1, refresh=False)
                bar.update(0)
                if path is not None and time.perf_counter() - last_save > CHECKPOINT_SECONDS:
                    save()
                    last_save = time.perf_counter()
                start = time.perf_counter()
                if state["elapsed"] >= config.seconds:
                    done = True
                    break
            else:
                state["epoch"] += 1
        bar.close()
        model.eval()
        if frozen:
            fold_standardisation(model.projection, mean, std)
        save(folded=True)
        return {**state, "threads": threads}
