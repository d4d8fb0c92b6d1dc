"""Run every benchmark script (``benchmarks/bench_*.py``) in order; each writes its own JSON
under ``reports/benchmarks/``. Training runs first: the search benchmark uses its model.

    .venv/bin/python benchmarks/run_all.py [--only training search]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("training", "search", "pretrained")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="benchmark names, e.g. training search")
    args = parser.parse_args(argv)
    scripts = sorted(
        HERE.glob("bench_*.py"), key=lambda p: (ORDER.index(p.stem[6:]) if p.stem[6:] in ORDER else 99, p.name)
    )
    if args.only:
        scripts = [s for s in scripts if s.stem[6:] in args.only]
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(script)])
        if result.returncode:
            print(f"{script.name} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
        print(f"== {script.name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
