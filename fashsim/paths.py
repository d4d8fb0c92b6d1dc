"""Where fashsim keeps things: the project root and its ``data/`` and ``reports/`` folders."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The project folder: ``$FASHSIM_HOME`` if set, else the checkout this package lives in,
    else the current working directory (for a plain ``pip install``)."""
    env = os.environ.get("FASHSIM_HOME")
    if env:
        return Path(env).expanduser().resolve()
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    return Path.cwd()


def data_dir() -> Path:
    """``<project>/data``: datasets, splits, checkpoints, indexes (ignored by git)."""
    return project_root() / "data"


def reports_dir() -> Path:
    """``<project>/reports``: figures, metrics, executed notebooks, benchmarks (ignored by git)."""
    return project_root() / "reports"


def notebooks_dir() -> Path:
    """The course notebooks shipped with the checkout (``<checkout>/notebooks``)."""
    shipped = _PACKAGE_DIR.parent / "notebooks"
    return shipped if shipped.is_dir() else project_root() / "notebooks"


def models_dir() -> Path:
    """``<project>/data/models``: trained models, one folder per run."""
    return data_dir() / "models"


def default_model_path() -> Path:
    """The trained default model that notebooks 03+ and the demo load."""
    return models_dir() / "triplet" / "model.pt"
