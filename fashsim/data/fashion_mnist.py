"""Fashion-MNIST: find it on disk, or download it with checksum verification, and load it.

A ``path`` argument is the only folder looked at (downloaded into when ``download=True``).
Without one, the search order (first folder holding the four idx files wins):

1. the folder named by the environment variable ``$FASHSIM_DATA``;
2. ``<project>/data/raw/fashion-mnist``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
4. download from the official Zalando URLs into ``<project>/data/raw/fashion-mnist``, each file
   checked against its published MD5, when ``download=True`` and the machine is online.

With no copy and no network, :class:`~fashsim.errors.DatasetNotFoundError` lists these options.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import DatasetFormatError, DatasetNotFoundError
from ..paths import data_dir
from .datasets import ImageArrayDataset

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: file names per split: (images, labels)
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: MD5 of the published .gz files (zalandoresearch/fashion-mnist README; torchvision uses the same).
MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

#: official download locations, tried in order.
MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHSIM_DATA"
SPLIT_SIZES = {"train": 60_000, "test": 10_000}


def default_download_dir() -> Path:
    """Where fashsim keeps its own copy: ``<project>/data/raw/fashion-mnist``."""
    return data_dir() / "raw" / "fashion-mnist"


def candidate_dirs() -> list[tuple[str, Path | None]]:
    """The folders searched when no path is given, in order, each with a human-readable origin."""
    env = os.environ.get(ENV_VAR)
    return [
        (f"${ENV_VAR}", Path(env).expanduser() if env else None),
        ("project data folder", default_download_dir()),
        ("Debian package dataset-fashion-mnist", SYSTEM_DIR),
    ]


def _has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path | None:
    """The first folder in the search order that holds all four files, or None. An explicit
    ``path`` is the only folder looked at: a wrong one is never silently replaced by another."""
    if path is not None:
        folder = Path(path).expanduser()
        return folder if _has_all_files(folder) else None
    for _, folder in candidate_dirs():
        if folder is not None and _has_all_files(folder):
            return folder
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> None:
    """Download ``url`` to ``dest`` through a temporary file (never leaves a partial file)."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https/http URLs)
        total = int(response.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
        try:
            with (
                os.fdopen(fd, "wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
            ):
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def download_fashion_mnist(
    dest: str | os.PathLike | None = None, *, timeout: float = 30.0, progress: bool = True
) -> Path:
    """Download the four files from the official mirrors into ``dest`` and verify their MD5.

    Files already present with the right checksum are kept. Raises
    :class:`DatasetNotFoundError` (with every option spelled out) when no mirror answers.
    """
    folder = Path(dest) if dest is not None else default_download_dir()
    failures: list[str] = []
    for name, expected in MD5.items():
        target = folder / name
        if target.is_file() and _md5(target) == expected:
            continue
        for mirror in MIRRORS:
            try:
                _fetch(mirror + name, target, timeout, progress)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                failures.append(f"{mirror}{name}: {getattr(exc, 'reason', exc)}")
                continue
            actual = _md5(target)
            if actual == expected:
                break
            target.unlink(missing_ok=True)
            failures.append(f"{mirror}{name}: checksum mismatch (md5 {actual}, expected {expected})")
        else:
            raise DatasetNotFoundError(not_found_message(None, failures))
    return folder


def not_found_message(path, download_failures: list[str] | None) -> str:
    """The "not found" explanation: every place searched and every way to provide the files."""
    if path is not None:  # an explicit folder is the only one looked at (find_fashion_mnist)
        folder = Path(path).expanduser()
        state = "incomplete" if folder.is_dir() else "missing"
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        return (
            f"Fashion-MNIST was not found in the folder given, {folder} ({state}: it needs the four files "
            f"{', '.join(MD5)}; it holds {', '.join(present[:8]) or 'nothing'}). Give the folder that holds "
            "them, or leave the path out to use the usual search order (python -m fashsim data --where)."
        )
    lines = ["Fashion-MNIST was not found. fashsim looked in:"]
    for origin, folder in candidate_dirs():
        if folder is None:
            lines.append(f"  - {origin}: not set")
        else:
            state = "complete" if _has_all_files(folder) else "incomplete" if folder.is_dir() else "missing"
            lines.append(f"  - {origin}: {folder} ({state})")
    if download_failures is None:
        lines.append("  - download: not attempted (download=False)")
    else:
        lines.append("  - download from the official mirrors failed:")
        lines.extend(f"      {failure}" for failure in download_failures[:4])
    lines += [
        "To fix it, do one of:",
        "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist",
        f"  - copy the four files ({', '.join(MD5)}) into {default_download_dir()}",
        f"    or into any folder and point ${ENV_VAR} at it",
        "  - when online: python -m fashsim data --download",
    ]
    return "\n".join(lines)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array, validating its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: cannot be read as an idx file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetFormatError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: header promises {expected} bytes of data for shape {shape}, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: str = "train", path: str | os.PathLike | None = None, *, download: bool = True
) -> ImageArrayDataset:
    """Load a Fashion-MNIST split ('train': 60000 or 'test': 10000 images of 28×28 uint8).

    ``path`` overrides the search order (see the module docstring); ``download=False`` never
    touches the network.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = find_fashion_mnist(path)
    if folder is None:
        if not download:
            raise DatasetNotFoundError(not_found_message(path, None))
        folder = download_fashion_mnist(path)
    images_file, labels_file = (folder / name for name in FILES[split])
    images = read_idx(images_file)
    labels = read_idx(labels_file).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != SPLIT_SIZES[split]:
        raise DatasetFormatError(f"{images_file}: unexpected shape {images.shape} for Fashion-MNIST {split}")
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise DatasetFormatError(f"{labels_file}: labels do not match {images_file}")
    return ImageArrayDataset(images, labels, CLASS_NAMES, source=str(folder))


def load_train_val(
    val_fraction: float | None = None, seed: int | None = None, path: str | os.PathLike | None = None
) -> tuple[ImageArrayDataset, ImageArrayDataset]:
    """The official train split cut into stratified train / validation parts: the course's split
    (:func:`fashsim.data.course_splits.course_splits`, what notebook 01 saved) unless another
    ``val_fraction`` or ``seed`` is asked for."""
    from .course_splits import DEFAULT_SEED, DEFAULT_VAL_FRACTION, load_course_train_val
    from .splits import train_val_test_split

    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(
            f"val_fraction must lie between 0 and 1 (the validation part picks the best epoch), got {val_fraction}"
        )

    if path is None and val_fraction in (None, DEFAULT_VAL_FRACTION) and seed in (None, DEFAULT_SEED):
        return load_course_train_val()
    full = load_fashion_mnist("train", path)
    parts = train_val_test_split(
        full.labels,
        val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
        seed=DEFAULT_SEED if seed is None else seed,
    )
    return full.subset(parts["train"]), full.subset(parts["val"])
