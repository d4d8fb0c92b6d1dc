"""Pretrained backbones on a CPU: why photo catalogs use a frozen backbone with cached features.

For each package-shipped ImageNet backbone (``weights="shipped"``):

* full fine-tuning throughput at 224 px (a few optimiser steps on batches of 32, channels_last):
  the cost the frozen path avoids;
* the frozen path on Fashion-MNIST upscaled to ``--size`` px: feature extraction (img/s), then a
  triplet head trained for ``--budget`` seconds on the cached features, evaluated leave-one-out
  on the test split.

    .venv/bin/python benchmarks/bench_pretrained.py [--size 64] [--budget 60] [--train-images 20000]

Writes ``reports/benchmarks/pretrained.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from fashsim.data import fashion_mnist
from fashsim.evaluation import metrics
from fashsim.fileio import atomic_write_bytes
from fashsim.model.inference import embed_arrays
from fashsim.model.networks import EmbeddingNet
from fashsim.model.pretrained import SHIPPED
from fashsim.paths import models_dir, reports_dir
from fashsim.train import TrainConfig, train
from fashsim.train.device import select_device

KEYS = ("recall@1", "recall@5", "recall@10", "map@r")


def fine_tune_images_per_second(backbone: str, device: torch.device, steps: int = 3, batch: int = 32) -> float:
    """Images/s of full fine-tuning (forward + backward + AdamW step) at 224 px."""
    model = EmbeddingNet(backbone, weights="shipped").to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()  # warm-up step, not timed
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def frozen_run(backbone: str, size: int, budget: float, train_set, val_set, test, device: str) -> dict:
    config = TrainConfig.budgeted(
        budget, backbone=backbone, weights="shipped", freeze_backbone=True, image_size=size, lr=1e-3, device=device
    )
    out = models_dir() / f"bench_frozen_{backbone}"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: extraction is part of what we measure
        start = time.perf_counter()
        result = train(config, train_set, val_set, out, resume=False, progress=sys.stderr.isatty(), feature_cache=cache)
        total = time.perf_counter() - start
    head_seconds = result.history[-1]["train_seconds"]
    embed_start = time.perf_counter()
    embeddings = embed_arrays(result.model, test.images, batch_size=256)
    test_seconds = time.perf_counter() - embed_start
    scores = metrics.retrieval_metrics(embeddings, test.labels, ks=(1, 5, 10))
    return {
        **{key: round(scores[key], 4) for key in KEYS},
        "image_size": size,
        "train_images": len(train_set),
        "head_train_seconds": round(head_seconds, 1),
        "epochs": len(result.history),
        "embed_images_per_second": round(len(test) / test_seconds, 1),  # backbone + head, test split
        "wall_seconds": round(total, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="backbone input size for Fashion-MNIST (default 64)")
    parser.add_argument("--budget", type=float, default=60.0, help="head training seconds (default 60)")
    parser.add_argument("--train-images", type=int, default=20000, help="training images (default 20000)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=str(reports_dir() / "benchmarks" / "pretrained.json"))
    args = parser.parse_args(argv)

    device = select_device(args.device)
    train_set, val_set = fashion_mnist.load_train_val()
    rng = np.random.default_rng(0)
    n_train = min(args.train_images, len(train_set))
    train_set = train_set.subset(np.sort(rng.choice(len(train_set), n_train, replace=False)))
    test = fashion_mnist.load_fashion_mnist("test")
    report = {"device": str(device)}
    for backbone in SHIPPED:
        report[backbone] = {
            "fine_tune_224px_images_per_second": round(fine_tune_images_per_second(backbone, device), 1),
            "frozen": frozen_run(backbone, args.size, args.budget, train_set, val_set, test, str(device)),
        }
        print(backbone, json.dumps(report[backbone]), flush=True)
    output = atomic_write_bytes(args.output, json.dumps(report, indent=2).encode())
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
