"""Command line: ``python -m fashsim COMMAND`` (or the ``fashsim`` console script).

Exit codes: 0 success, 1 a fashsim error (message on stderr, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import FashsimError


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


def _cmd_data(args) -> int:
    from . import fashion_mnist

    if args.download:
        folder = fashion_mnist.download_fashion_mnist()
        print(f"Fashion-MNIST: {folder}")
        return 0
    folder = fashion_mnist.find_fashion_mnist(args.path)
    if args.where:
        if folder is None:
            raise FashsimError(fashion_mnist._not_found_message(args.path, None))
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


def build_parser() -> argparse.ArgumentParser:
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
        "-p", "--param", action="append", type=_parse_override, metavar="NOTEBOOK.PARAM=VALUE",
        help="override a notebook parameter, e.g. -p dataset_prep.seed=1 (repeatable)",
    )
    run.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FashsimError as exc:
        print(f"fashsim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fashsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
