"""What each notebook measured, as JSON under ``reports/results/``: the notebooks write it, the
report and the tests read it (so no table is ever typed by hand, and no test reads printed text)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes
from ..paths import reports_dir


def results_dir() -> Path:
    """``reports/results``."""
    return reports_dir() / "results"


def _plain(value):
    """numpy scalars and arrays → JSON-able Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def save_results(name: str, data: dict) -> Path:
    """Write ``reports/results/<name>.json`` atomically; returns its path."""
    return atomic_write_bytes(results_dir() / f"{name}.json", json.dumps(data, indent=2, default=_plain).encode())


def load_results(name: str, default=None):
    """The results ``name`` saved, or ``default`` when that notebook has not run."""
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else default


def update_results(name: str, **entries) -> Path:
    """Merge ``entries`` into ``reports/results/<name>.json`` (created when missing)."""
    return save_results(name, {**load_results(name, {}), **entries})


def all_results() -> dict[str, dict]:
    """Every saved result file, by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir().glob("*.json"))}
