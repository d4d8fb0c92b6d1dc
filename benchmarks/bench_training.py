"""Training benchmark: the default triplet recipe vs a cross-entropy baseline of equal budget vs
raw pixels, evaluated leave-one-out on the Fashion-MNIST test split; plus the same triplet model
without the default's flip averaging (``EmbeddingNet.flip_average``: each image embedded with its
mirror image, 2× the query cost), to show what that buys.

    .venv/bin/python benchmarks/bench_training.py [--budget SECONDS] [--device auto]

Writes ``reports/benchmarks/training.json`` and leaves the trained default model in
``data/models/triplet/model.pt`` (where notebook 03 and the demo look for it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace

import numpy as np

from fashsim.data import fashion_mnist
from fashsim.evaluation import metrics
from fashsim.evaluation.baselines import baseline_embeddings
from fashsim.fileio import atomic_write_bytes
from fashsim.model.inference import embed_arrays
from fashsim.model.networks import EmbeddingNet
from fashsim.paths import models_dir, reports_dir
from fashsim.train import TrainConfig, train
from fashsim.train.config import COURSE_BUDGET_SECONDS

KEYS = ("recall@1", "recall@5", "recall@10", "map@r")
#: Fashion-MNIST's upper-body classes (T-shirt/top, pullover, coat, shirt): where the misses are.
UPPER_BODY = (0, 2, 4, 6)


def evaluate(embeddings: np.ndarray, labels: np.ndarray, *, upper_body: bool = False) -> dict:
    """Leave-one-out scores on the test split; ``upper_body``: also the same scores among the
    upper-body classes alone (their images query each other)."""
    scores = metrics.retrieval_metrics(embeddings, labels, ks=(1, 5, 10))
    out = {key: round(scores[key], 4) for key in KEYS}
    if upper_body:
        mask = np.isin(labels, UPPER_BODY)
        out["upper_body"] = evaluate(embeddings[mask], labels[mask])
    return out


def parse_setting(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` of a training setting (VALUE read as JSON when it is JSON, else text)."""
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def run(config: TrainConfig, name: str, train_set, val_set, test) -> tuple[dict, EmbeddingNet]:
    out = models_dir() / name
    shutil.rmtree(out, ignore_errors=True)  # a benchmark measures a fresh run
    result = train(config, train_set, val_set, out, resume=False, progress=sys.stderr.isatty())
    seconds = result.history[-1]["train_seconds"]
    images = sum(h["images"] for h in result.history)
    return {
        **evaluate(embed_arrays(result.model, test.images), test.labels, upper_body=True),
        "train_seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 1),
        "epochs": len(result.history),
        "device": str(next(result.model.parameters()).device),
        "precision": json.loads((out / "history.json").read_text())["precision"],  # float32 | bfloat16 | float16
        "recipe": config.to_dict(),
        "stopped": result.stopped,
    }, result.model


def without_flip(model: EmbeddingNet, test) -> dict | None:
    """The scores of the same weights embedding each image alone (None when it already does)."""
    if not model.flip_average:
        return None
    model.flip_average = False
    try:
        return evaluate(embed_arrays(model, test.images), test.labels, upper_body=True)
    finally:
        model.flip_average = True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget",
        type=float,
        default=COURSE_BUDGET_SECONDS,
        help=f"training seconds per model (default {COURSE_BUDGET_SECONDS:.0f}, the course recipe's)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--recipe",
        nargs="+",
        action="append",
        metavar="NAME=VALUE",
        help="also train this variant of the default recipe on the same budget, e.g. "
        "--recipe mining=batch_hard ce_weight=1.0 (repeatable; reported under 'variants')",
    )
    parser.add_argument("--skip-baselines", action="store_true", help="no cross-entropy model, no raw pixels")
    parser.add_argument("--output", default=str(reports_dir() / "benchmarks" / "training.json"))
    args = parser.parse_args(argv)

    train_set, val_set = fashion_mnist.load_train_val()
    test = fashion_mnist.load_fashion_mnist("test")
    base = TrainConfig.course(max_seconds=args.budget, device=args.device)
    triplet, model = run(base, "triplet", train_set, val_set, test)
    report = {"triplet": triplet, "triplet_without_flip_average": without_flip(model, test)}
    if not args.skip_baselines:
        report["cross_entropy"] = run(replace(base, loss="cross_entropy"), "cross_entropy", train_set, val_set, test)[0]
        report["raw_pixels"] = evaluate(baseline_embeddings("raw_pixels", test.images), test.labels)
    variants = {}
    for settings in args.recipe or []:
        changes = dict(parse_setting(text) for text in settings)
        name = " ".join(f"{k}={v}" for k, v in changes.items())
        variant, model = run(replace(base, **changes), "triplet-variant", train_set, val_set, test)
        variants[name] = {**variant, "without_flip_average": without_flip(model, test)}
    if variants:
        report["variants"] = variants
    output = atomic_write_bytes(args.output, json.dumps(report, indent=2).encode())
    rows = {**report, **variants}
    for name in [n for n in rows if n != "variants" and rows[n]]:
        print(f"{name:14s} " + "  ".join(f"{k} {rows[name][k]:.4f}" for k in KEYS))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
