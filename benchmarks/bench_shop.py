"""Your own shop, end to end, on the generated colour shop (CPU).

1. generate the default colour shop (Fashion-MNIST garments as colour product photos, Kaggle layout);
2. hold out 20 % of every style plus an open set of style combinations (every checked dress, ...);
3. build the collection with :func:`fashsim.app.shop.build_shop_collection` (stream + embed +
   train + index), timed end to end together with the generation;
4. evaluate on the held-out items — style R@K / MAP@R, category R@1, colour- and pattern-match@K,
   the open set — next to the baselines (colour histogram, raw pixels, frozen ImageNet features,
   the greyscale Fashion-MNIST model when ``data/models/triplet/model.pt`` exists);
5. time single RGB queries end to end (JPEG bytes → top-10, one thread);
6. with ``--compare BACKBONE ...``, build the same shop with other recipes (e.g. the frozen
   ``mobilenet_v2``) and evaluate them the same way.

``--shape-only`` measures what the recipe reaches on the garments' kinds alone: the same shop in
one colour, every item solid, so "the same style" is the kind (articleType) and the category
score has no colour or pattern to get past; no open set (its rules would hold out whole kinds),
and K raised so that a batch keeps P×K = 256 images over the 10 kinds. Its category R@1 is what
the recipe reaches when the kind is all there is to learn (it also trains on more items than the
full shop, whose open set is not trained on).

    .venv/bin/python benchmarks/bench_shop.py [--size 20000] [--train-seconds 240] [--compare mobilenet_v2]
    .venv/bin/python benchmarks/bench_shop.py --shape-only --train-seconds 1500 --out reports/benchmarks/shop_shape_only.json

Writes ``reports/benchmarks/shop.json``. The machine's other load is recorded (``os.getloadavg``):
on a shared CPU every timing here is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fashsim.app.shop import DEFAULT_BACKBONE, build_shop_collection
from fashsim.data.catalogs import open_catalog
from fashsim.data.colour_shop import DEFAULT_SIZE, generate_colour_shop
from fashsim.evaluation.shop import comparison_rows, evaluate_shop, shop_split
from fashsim.fileio import atomic_write_bytes
from fashsim.paths import reports_dir

TARGETS = {
    "end_to_end_seconds": 480,
    "style_recall@1": 0.85,
    "category_recall@1": 0.88,
    "baseColour_match@5": 0.99,
    "query_p50_ms": 25.0,
}


#: images per kind in a ``--shape-only`` batch: P×K stays 256 (10 kinds × 26) as in the full shop's 32 × 8
SHAPE_ONLY_K = 26


def cpu_model() -> str | None:
    """The CPU's model name (Linux), for telling runs on different machines apart."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return None


def query_latency(build, test_rows, n: int = 100) -> dict:
    """Single-query latency, one thread: JPEG bytes → decode → prepare → embed → top-10."""
    import torch

    searcher = build.searcher(threads=1)
    blobs = [Path(build.records[i]["source"]).read_bytes() for i in test_rows[:n]]
    searcher.search(blobs[0], k=10)  # warm-up
    times = []
    for blob in blobs:
        start = time.perf_counter()
        searcher.search(blob, k=10)
        times.append((time.perf_counter() - start) * 1000)
    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "queries": len(times),
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p90_ms": round(float(np.percentile(times, 90)), 2),
    }


def run_recipe(catalog_dir: Path, out: Path, parts: dict, backbone: str, args) -> tuple[object, float]:
    start = time.perf_counter()
    build = build_shop_collection(
        catalog_dir,
        out,
        backbone=backbone,
        train_indices=parts["train"],
        train_seconds=args.train_seconds if backbone == DEFAULT_BACKBONE else None,
        max_epochs=args.max_epochs if backbone == DEFAULT_BACKBONE else None,
        train_options={"k": SHAPE_ONLY_K} if args.shape_only else None,
        workers=args.workers,
        resume=False,
        progress=sys.stderr.isatty(),
    )
    return build, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-seconds", type=float, help="training budget of the default recipe")
    parser.add_argument("--max-epochs", type=int, help="epoch cap of the default recipe")
    parser.add_argument(
        "--shape-only",
        action="store_true",
        help="one colour, solid items, no open set: the recipe's category score on the garments' kinds alone",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--compare", nargs="*", default=[], metavar="BACKBONE", help="other recipes to build and evaluate"
    )
    parser.add_argument("--baseline-image-size", type=int, default=112, help="frozen ImageNet baseline input size")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--out", default=str(reports_dir() / "benchmarks" / "shop.json"))
    args = parser.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_shop_"))
    load_before = os.getloadavg()
    try:
        catalog_dir = work / "colour-shop"
        shutil.rmtree(catalog_dir, ignore_errors=True)
        start = time.perf_counter()
        generate_colour_shop(
            catalog_dir,
            size=args.size,
            image_size=args.image_size,
            workers=args.workers,
            progress=sys.stderr.isatty(),
            **({"colours": 1, "patterns": ["Solid"]} if args.shape_only else {}),
        )
        generate_seconds = time.perf_counter() - start
        catalog = open_catalog(catalog_dir)
        records = catalog.records()
        columns = ["articleType", "baseColour", "pattern"]
        parts = shop_split(records, columns, test_fraction=0.2, **({"open_set": ()} if args.shape_only else {}))
        print(
            f"generated {len(catalog)} items in {generate_seconds:.0f} s; train {len(parts['train'])}, "
            f"test {len(parts['test'])}, open set {len(parts['unseen'])}",
            flush=True,
        )

        build, build_seconds = run_recipe(catalog_dir, work / "shop", parts, DEFAULT_BACKBONE, args)
        print(f"built in {build_seconds:.0f} s: {build.summary['seconds']}", flush=True)
        local = {k: build.positions(v) for k, v in parts.items()}
        paths = [r["source"] for r in build.records]
        start = time.perf_counter()
        report = evaluate_shop(
            build.embeddings,
            build.records,
            paths,
            local,
            build.label_columns,
            workers=args.workers,
            baseline_image_size=args.baseline_image_size,
            progress=sys.stderr.isatty(),
        )
        evaluate_seconds = time.perf_counter() - start
        latency = query_latency(build, local["test"])
        recipes = {DEFAULT_BACKBONE: {"build_seconds": round(build_seconds, 1), "summary": build.summary}}
        for backbone in args.compare:
            other, seconds = run_recipe(catalog_dir, work / f"shop-{backbone}", parts, backbone, args)
            other_report = evaluate_shop(
                other.embeddings, other.records, paths, local, other.label_columns, baselines=(), workers=args.workers
            )
            report["methods"][f"trained_{backbone}"] = other_report["methods"]["trained"]
            recipes[backbone] = {"build_seconds": round(seconds, 1), "summary": other.summary}
            print(f"{backbone}: built in {seconds:.0f} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    trained = report["methods"]["trained"]["test"]
    end_to_end = generate_seconds + build_seconds
    beats = {
        name: report["methods"]["trained"]["test"]["style_map@r"] > m["test"]["style_map@r"]
        for name, m in report["methods"].items()
        if name != "trained" and not name.startswith("trained_")
    }
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            # bfloat16 where the CPU computes it natively: more epochs in the same seconds than float32
            "training_precision": build.summary["train"].get("precision"),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            # other work on the machine (a 1-minute load above half the cores) slows every step
            "shared_cpu": load_before[0] > 0.5 * (os.cpu_count() or 1),
        },
        "shop": {
            "mode": "shape_only" if args.shape_only else "full",
            "size": args.size,
            "image_size": args.image_size,
            "styles": build.summary["styles"],
            "split": {k: int(len(v)) for k, v in parts.items()},
        },
        "seconds": {
            "generate": round(generate_seconds, 1),
            "build": round(build_seconds, 1),
            "end_to_end": round(end_to_end, 1),
            "build_steps": build.summary["seconds"],
            "evaluate_with_baselines": round(evaluate_seconds, 1),
        },
        "embed_images_per_second": build.summary["embed_images_per_second"],
        "default_recipe": DEFAULT_BACKBONE,
        "recipes": recipes,
        "query_latency": latency,
        "table": comparison_rows(report),
        "trained_beats_every_baseline_on_style_map@r": all(beats.values()) if beats else None,
        "targets": {
            "end_to_end_seconds": [
                round(end_to_end, 1),
                TARGETS["end_to_end_seconds"],
                end_to_end <= TARGETS["end_to_end_seconds"],
            ],
            **{
                key: [round(trained[key], 4), TARGETS[key], trained[key] >= TARGETS[key]]
                for key in ("style_recall@1", "category_recall@1", "baseColour_match@5")
            },
            **(
                {
                    "open_set_style_recall@1": [
                        round(report["methods"]["trained"]["open_set"]["style_recall@1"], 4),
                        None,
                        None,
                    ]
                }
                if "open_set" in report["methods"]["trained"]
                else {}
            ),
            "query_p50_ms": [latency["p50_ms"], TARGETS["query_p50_ms"], latency["p50_ms"] <= TARGETS["query_p50_ms"]],
        },
        "evaluation": report,
    }
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    print(json.dumps({k: result[k] for k in ("seconds", "targets", "table", "query_latency")}, indent=2))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
