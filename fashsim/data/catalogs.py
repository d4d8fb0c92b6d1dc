"""Users' own image catalogs: an image folder, a CSV file, or DeepFashion In-shop.

Each loader returns a :class:`FileCatalog`: image paths, an integer category per image, the
category names, and per-item extra metadata (CSV columns, DeepFashion item id and split).
Images are not decoded here; :func:`fashsim.data.uploads.load_image` does that when needed;
:func:`load_catalog_images` decodes a whole catalog into the model's input format.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetFormatError, DatasetNotFoundError, FashsimError, InvalidImageError
from .datasets import ImageArrayDataset
from .transforms import InputSpec, prepare_image
from .uploads import load_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class FileCatalog:
    """Images on disk: ``paths[i]`` has category ``class_names[labels[i]]`` and metadata ``extra[i]``."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    extra: tuple[dict, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.extra:
            object.__setattr__(self, "extra", tuple({} for _ in self.paths))
        if not (len(self.paths) == len(self.labels) == len(self.extra)):
            raise DatasetFormatError("paths, labels and extra metadata differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> FileCatalog:
        """The items at ``indices``, same category names."""
        idx = np.asarray(indices, dtype=np.int64)
        return FileCatalog(
            tuple(self.paths[i] for i in idx),
            self.labels[idx],
            self.class_names,
            tuple(self.extra[i] for i in idx),
        )

    def categories(self) -> list[str]:
        """The category name of every item."""
        return [self.class_names[i] for i in self.labels]

    def group_ids(self, key: str) -> np.ndarray:
        """Integer ids of an extra field (e.g. DeepFashion's ``item_id``), for retrieval relevance."""
        values = [meta.get(key) for meta in self.extra]
        if any(v is None for v in values):
            raise KeyError(f"not every item has the metadata field {key!r}")
        _, ids = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
        return ids.astype(np.int64)


def _is_image_file(path: Path, extensions) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions


def load_image_folder(root: str | os.PathLike, *, extensions=IMAGE_EXTENSIONS) -> FileCatalog:
    """One sub-folder per category (``root/<category>/**/<image>``), like torchvision's ImageFolder.

    Files with other extensions and hidden files are ignored; empty category folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if _is_image_file(p, extensions))
        if not files:
            continue
        names.append(folder.name)
        paths.extend(files)
        labels.extend([len(names) - 1] * len(files))
    if not paths:
        raise DatasetFormatError(
            f"{root} holds no images in category sub-folders: expected {root}/<category>/<image>"
            f" with extensions {', '.join(sorted(extensions))}"
        )
    return FileCatalog(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(names))


_PATH_COLUMNS = ("path", "image", "image_path", "filename", "file")
_CATEGORY_COLUMNS = ("category", "articleType", "label", "class")


def load_csv_catalog(
    csv_path: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    path_column: str | None = None,
    category_column: str | None = None,
    id_column: str = "id",
    image_extension: str = ".jpg",
    check_files: bool = True,
) -> FileCatalog:
    """A CSV catalog: one row per image, a path (or an id) column, a category column, any extras.

    * Path: ``path_column`` (default: the first of path/image/image_path/filename/file present),
      relative to ``image_dir`` (default: the CSV's folder). Without a path column the image is
      ``image_dir/<id><image_extension>`` — the Kaggle "Fashion Product Images" layout
      (``styles.csv`` + ``images/<id>.jpg``; ``image_dir`` then defaults to ``<csv folder>/images``).
    * Category: ``category_column`` (default: the first of category/articleType/label/class).
    * Rows with more fields than the header (unquoted commas in the last column, as in Kaggle's
      ``productDisplayName``) are repaired by joining the surplus into the last column.
    * Rows without a category, or whose image file is missing (``check_files``), are skipped with
      one warning that counts them.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetNotFoundError(f"CSV catalog {csv_path} does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DatasetFormatError(f"{csv_path} is empty")
    header = [h.strip() for h in rows[0]]
    path_column = path_column or next((c for c in _PATH_COLUMNS if c in header), None)
    category_column = category_column or next((c for c in _CATEGORY_COLUMNS if c in header), None)
    if category_column is None or category_column not in header:
        raise DatasetFormatError(
            f"{csv_path}: no category column (looked for {category_column or ', '.join(_CATEGORY_COLUMNS)});"
            f" columns are: {', '.join(header)}"
        )
    if path_column is None and id_column not in header:
        raise DatasetFormatError(
            f"{csv_path}: needs a path column ({', '.join(_PATH_COLUMNS)}) or an {id_column!r} column;"
            f" columns are: {', '.join(header)}"
        )
    if path_column is not None and path_column not in header:
        raise DatasetFormatError(f"{csv_path}: no column {path_column!r}; columns are: {', '.join(header)}")
    if image_dir is None:
        image_dir = csv_path.parent if path_column else csv_path.parent / "images"
    image_dir = Path(image_dir)

    paths: list[Path] = []
    categories: list[str] = []
    extra: list[dict] = []
    skipped = {"no category": 0, "missing image": 0, "short row": 0}
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            row = row[: len(header) - 1] + [",".join(row[len(header) - 1 :])]
        if len(row) < len(header):
            skipped["short row"] += 1
            continue
        record = dict(zip(header, (cell.strip() for cell in row)))
        category = record.pop(category_column)
        if not category:
            skipped["no category"] += 1
            continue
        relative = record.pop(path_column) if path_column else f"{record[id_column]}{image_extension}"
        path = Path(relative) if Path(relative).is_absolute() else image_dir / relative
        if check_files and not path.is_file():
            skipped["missing image"] += 1
            continue
        paths.append(path)
        categories.append(category)
        extra.append(record)
    if any(skipped.values()):
        detail = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
        warnings.warn(f"{csv_path}: skipped {sum(skipped.values())} rows ({detail})", stacklevel=2)
    if not paths:
        raise DatasetFormatError(f"{csv_path}: no usable rows (images looked up under {image_dir})")
    names, labels = np.unique(np.asarray(categories), return_inverse=True)
    return FileCatalog(tuple(paths), labels.astype(np.int64), tuple(str(n) for n in names), tuple(extra))


def load_deepfashion_inshop(root: str | os.PathLike, *, partition_file: str = "list_eval_partition.txt") -> FileCatalog:
    """DeepFashion In-shop Clothes Retrieval: ``root/list_eval_partition.txt`` + ``root/img/...``.

    The partition file holds a count line, a header line (``image_name item_id evaluation_status``)
    and one line per image. The category is the path's ``<gender>/<type>`` (e.g. ``WOMEN/Dresses``);
    ``extra`` holds ``item_id`` (the retrieval identity: use :meth:`FileCatalog.group_ids`) and
    ``split`` (train / query / gallery, see :func:`fashsim.splits.inshop_split`).
    """
    root = Path(root)
    partition = root / partition_file
    if not partition.is_file():
        raise DatasetNotFoundError(f"DeepFashion In-shop: {partition} does not exist")
    lines = [line.split() for line in partition.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0][0].isdigit() or lines[1][:3] != ["image_name", "item_id", "evaluation_status"]:
        raise DatasetFormatError(
            f"{partition}: expected a count line then the header 'image_name item_id evaluation_status'"
        )
    entries = lines[2:]
    if int(lines[0][0]) != len(entries):
        raise DatasetFormatError(f"{partition}: announces {lines[0][0]} images but lists {len(entries)}")
    paths, categories, extra = [], [], []
    for number, parts in enumerate(entries, start=3):
        if len(parts) != 3:
            raise DatasetFormatError(f"{partition}:{number}: expected 3 fields, got {len(parts)}")
        image_name, item_id, status = parts
        if status not in ("train", "query", "gallery"):
            raise DatasetFormatError(f"{partition}:{number}: unknown evaluation_status {status!r}")
        pieces = Path(image_name).parts
        category = "/".join(pieces[1:3]) if len(pieces) >= 4 else "unknown"
        paths.append(root / image_name)
        categories.append(category)
        extra.append({"item_id": item_id, "split": status})
    names, labels = np.unique(np.asarray(categories), return_inverse=True)
    return FileCatalog(tuple(paths), labels.astype(np.int64), tuple(str(n) for n in names), tuple(extra))


def load_catalog_images(catalog: FileCatalog, spec: InputSpec, *, progress: bool = True) -> ImageArrayDataset:
    """Decode and prepare every catalog image for a model with input ``spec``: uint8
    ``(N, size, size[, 3])`` in memory. Unreadable files stop it with one error listing them all
    (nothing is skipped silently)."""
    shape = (spec.size, spec.size) if spec.channels == 1 else (spec.size, spec.size, 3)
    images = np.zeros((len(catalog), *shape), np.uint8)
    bad = []
    for i, path in enumerate(tqdm(catalog.paths, desc="loading images", disable=not progress)):
        try:
            prepared = prepare_image(load_image(path), spec)
        except InvalidImageError as exc:
            bad.append(f"{path}: {exc}")
            continue
        images[i] = prepared
    if bad:
        listed = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise FashsimError(
            f"{len(bad)} of {len(catalog)} catalog images cannot be read; fix or remove them:\n  {listed}")
    return ImageArrayDataset(images, np.asarray(catalog.labels, np.int64), tuple(catalog.class_names), source="catalog")
