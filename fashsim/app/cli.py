"""Command line: ``python -m fashsim COMMAND`` (or the ``fashsim`` console script).

Exit codes: 0 success, 1 a fashsim error (message on stderr, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import FashsimError
from ..model.sharded_embedding import add_embed_shards_parser
from ..train.config import add_arguments as add_training_arguments
from . import webapp
from .shop import add_shop_parser


def _parse_override(text: str) -> tuple[str, str, object]:
    """``NOTEBOOK.PARAM=VALUE`` (VALUE parsed as JSON when it is valid JSON, else a string)."""
    try:
        target, value = text.split("=", 1)
        notebook, param = target.split(".", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NOTEBOOK.PARAM=VALUE, got {text!r}") from None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return notebook, param, parsed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text}")
    return value


def _cmd_data(args) -> int:
    from ..data import fashion_mnist

    if args.download:
        folder = fashion_mnist.download_fashion_mnist(args.path)
        print(f"Fashion-MNIST: {folder}")
        return 0
    folder = fashion_mnist.find_fashion_mnist(args.path)
    if args.where:
        if folder is None:
            raise FashsimError(fashion_mnist.not_found_message(args.path, None))
        print(folder)
        return 0
    # --check (default): load both splits for real
    for split in ("train", "test"):
        data = fashion_mnist.load_fashion_mnist(split, args.path, download=False)
        print(f"Fashion-MNIST {split}: {len(data)} images {data.images.shape[1:]} from {data.source}")
    return 0


def _cmd_run(args) -> int:
    from .pipeline import run_pipeline

    overrides: dict[str, dict] = {}
    for notebook, param, value in args.param or []:
        overrides.setdefault(notebook, {})[param] = value
    executed = run_pipeline(args.profile, only=args.only, overrides=overrides, progress=not args.quiet)
    print(f"pipeline '{args.profile}': {len(executed)} notebooks executed")
    return 0


def _cmd_train(args) -> int:
    from ..data.fashion_mnist import load_train_val
    from ..paths import default_model_path
    from ..train import train
    from ..train.config import from_arguments

    config = from_arguments(args)
    out = args.out or default_model_path().parent
    # the course's split (notebook 01's) unless --val-fraction asks for another; --seed is the
    # model's, sampler's and augmentation's seed, not the split's (as in notebook 02)
    train_set, val_set = load_train_val(val_fraction=args.val_fraction)
    result = train(config, train_set, val_set, out, resume=not args.fresh)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    if not result.best:
        raise FashsimError(f"no epoch finished ({result.stopped}): no model was written to {out}")
    print(
        f"best epoch {result.best.get('epoch')}: val R@1 {result.best.get('val_recall@1', 0):.4f}, "
        f"MAP@R {result.best.get('val_map@r', 0):.4f}; model: {out}/model.pt ({result.stopped})"
    )
    return 0


def _cmd_index(args) -> int:
    from ..model.persistence import load_model
    from ..paths import default_model_path
    from .course import default_index_dir, index_fashion_mnist

    model = load_model(args.model or default_model_path())
    target = args.out or default_index_dir()
    collection = index_fashion_mnist(
        model, kind=args.kind, store=args.store, location=target, max_per_split=args.max_per_split
    )
    print(
        f"indexed {len(collection)} Fashion-MNIST items ({args.store or 'faiss'}, {collection.index.kind}) -> {target}"
    )
    return 0


def _cmd_search(args) -> int:
    from ..paths import default_model_path
    from ..search.stores import open_searcher
    from .course import default_index_dir

    searcher = open_searcher(
        args.model or default_model_path(), args.index or default_index_dir(), store=args.store, threads=1
    )
    searcher.require_category(args.category)
    hits = searcher.search(args.image, k=args.k, category=args.category)
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
    else:
        for hit in hits:
            print(f"{hit.rank:3d}  {hit.score:.4f}  {hit.category:12s}  {hit.source}")
    return 0


def _cmd_evaluate(args) -> int:
    from ..data.fashion_mnist import load_fashion_mnist
    from ..evaluation.metrics import retrieval_metrics
    from ..model.inference import embed_arrays
    from ..model.persistence import load_model
    from ..paths import default_model_path

    model = load_model(args.model or default_model_path())
    test = load_fashion_mnist("test")
    scores = retrieval_metrics(embed_arrays(model, test.images), test.labels, ks=(1, 5, 10))
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}, indent=2))
    return 0


def _cmd_serve(args) -> int:
    from .webapp import serve

    if args.store:
        os.environ["FASHSIM_STORE"] = args.store  # the app's kernels inherit it
    return serve(
        args.collection,
        args.model,
        port=args.port,
        preheat=args.preheat,
        cull_idle_timeout=args.cull_idle_timeout,
        open_browser=args.open,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``fashsim`` argument parser with every subcommand (it imports no torch)."""
    parser = argparse.ArgumentParser(prog="fashsim", description="Fashion image similarity search.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="find, check or download Fashion-MNIST")
    mode = data.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="load both splits (default)")
    mode.add_argument("--where", action="store_true", help="print the folder that will be used")
    mode.add_argument("--download", action="store_true", help="download from the official mirrors (MD5-checked)")
    data.add_argument("--path", help="an explicit folder holding the four .gz files")
    data.set_defaults(func=_cmd_data)

    run = sub.add_parser("run", help="execute the notebook pipeline headless (papermill)")
    run.add_argument("--profile", default="full", choices=["full", "smoke"], help="full (default) or smoke")
    run.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks (number or name)")
    run.add_argument(
        "-p",
        "--param",
        action="append",
        type=_parse_override,
        metavar="NOTEBOOK.PARAM=VALUE",
        help="override a notebook parameter, e.g. -p dataset_prep.seed=1 (repeatable)",
    )
    run.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    run.set_defaults(func=_cmd_run)

    train = sub.add_parser(
        "train",
        help="train the triplet model on Fashion-MNIST (resumes if interrupted)",
        description="Every training setting is a flag; the defaults are the course's recipe "
        "(fashsim.train.TrainConfig.course()).",
    )
    add_training_arguments(train)
    train.add_argument("--budget", dest="max_seconds", type=float, help="alias of --max-seconds")
    train.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of the train split held out for validation (default: the course's split, 0.1, as notebook 01 saved it)",
    )
    train.add_argument("--out", help="output folder (default data/models/triplet)")
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    train.set_defaults(func=_cmd_train)

    index = sub.add_parser("index", help="embed all 70 000 Fashion-MNIST images and save a FAISS index")
    index.add_argument("--model", help="model file (default data/models/triplet/model.pt)")
    index.add_argument(
        "--kind",
        default="auto",
        help="auto (by size), flat, hnsw, ivfpq, ivfpq_refine, ivfsq, or a FAISS factory string (default auto)",
    )
    index.add_argument(
        "--out", help="index folder, Milvus Lite .db file or Milvus URI (default data/index/fashion-mnist)"
    )
    index.add_argument("--store", choices=["faiss", "milvus"], help="vector store (default: $FASHSIM_STORE or faiss)")
    index.add_argument(
        "--max-per-split", type=_positive_int, metavar="N", help="index only the first N images of each split"
    )
    index.set_defaults(func=_cmd_index)

    search = sub.add_parser("search", help="the catalog items most similar to an image")
    search.add_argument("image", help="an image file (JPEG, PNG, WebP, ...)")
    search.add_argument("-k", type=_positive_int, default=10, help="number of results (default 10)")
    search.add_argument("--category", help="only items of this category")
    search.add_argument("--model", help="model file (default data/models/triplet/model.pt)")
    search.add_argument(
        "--index", help="index folder, Milvus Lite .db file or Milvus URI (default data/index/fashion-mnist)"
    )
    search.add_argument("--store", choices=["faiss", "milvus"], help="vector store (default: $FASHSIM_STORE or faiss)")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(func=_cmd_search)

    evaluate = sub.add_parser("evaluate", help="leave-one-out retrieval metrics on the Fashion-MNIST test split")
    evaluate.add_argument("--model", help="model file (default data/models/triplet/model.pt)")
    evaluate.set_defaults(func=_cmd_evaluate)

    serve = sub.add_parser("serve", help="the search app as a web page (Voila) on http://127.0.0.1:PORT/")
    serve.add_argument(
        "--collection",
        help="a saved collection folder, or a shop build's folder (default data/index/fashion-mnist, built first "
        "if missing)",
    )
    serve.add_argument(
        "--model",
        help="its model file (default: model.pt in the collection folder or, for a shop build, beside it; else "
        "data/models/triplet/model.pt, trained first if missing)",
    )
    serve.add_argument("--port", type=int, default=8866, help="port on 127.0.0.1 (default 8866)")
    serve.add_argument(
        "--store",
        choices=["faiss", "milvus"],
        help="vector store of --collection (default: $FASHSIM_STORE or faiss); Milvus Lite serves one page at a "
        "time (it locks its file), a Milvus server (--collection http://HOST:19530#NAME) any number",
    )
    serve.add_argument(
        "--preheat",
        type=int,
        default=webapp.PRELOADED_KERNELS,
        metavar="N",
        help=f"kernels kept ready with the app loaded, so N visitors arriving together get their page at once "
        f"(default {webapp.PRELOADED_KERNELS}; about 660 MiB each; 0: none)",
    )
    serve.add_argument(
        "--cull-idle-timeout",
        type=int,
        default=60,
        metavar="SECONDS",
        help="shut down a kernel whose page is gone after this long (default 60)",
    )
    serve.add_argument("--open", action="store_true", help="open a browser")
    serve.set_defaults(func=_cmd_serve)
    add_shop_parser(sub)
    add_embed_shards_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fashsim`` with ``argv``; bad input gives a one-line error and exit code 1, Ctrl-C 130."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FashsimError, ValueError, OSError) as exc:  # bad data, files, paths or values: a message, no traceback
        print(f"fashsim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fashsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
