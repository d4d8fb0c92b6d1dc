"""Users' own image catalogs: an image folder, a CSV file, or DeepFashion In-shop.

Each loader returns a :class:`FileCatalog`: image paths, an integer category per image, the
category names, and per-item extra metadata (CSV columns, DeepFashion item id and split).
Images are not decoded here; :func:`fashsim.data.uploads.load_image` does that when needed;
:func:`load_catalog_images` decodes a whole catalog into the model's input format.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetFormatError, DatasetNotFoundError, FashsimError, InvalidImageError
from .datasets import ImageArrayDataset
from .transforms import InputSpec, prepare_image
from .uploads import load_image

#: what the catalog loaders take as images (what Pillow decodes; HEIC needs a plug-in: convert those)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"}
)


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

    def column(self, name: str) -> list[str]:
        """The values of a metadata column for every item, as text (missing values: ``""``).
        ``"category"`` is the item's category unless the metadata has its own ``category``."""
        if name == "category" and not any("category" in meta for meta in self.extra):
            return self.categories()
        if not any(name in meta for meta in self.extra):
            raise KeyError(f"no metadata column {name!r}; columns: {', '.join(self.columns())}")
        return ["" if meta.get(name) is None else str(meta.get(name)) for meta in self.extra]

    def columns(self) -> list[str]:
        """Every metadata column name (in first-seen order), ``category`` included."""
        names = dict.fromkeys(["category"])
        for meta in self.extra:
            names.update(dict.fromkeys(meta))
        return list(names)

    def combined_labels(self, columns: Sequence[str], *, sep: str = " / ") -> tuple[np.ndarray, tuple[str, ...]]:
        """Integer labels of the combination of ``columns`` (e.g. ``("articleType", "baseColour",
        "pattern")``: "the same style"), and the sorted combination names (``"Shirts / Red / Striped"``)."""
        if not columns:
            raise ValueError("combined_labels needs at least one column")
        values = [self.column(c) for c in columns]
        keys = np.asarray([sep.join(parts) for parts in zip(*values)], dtype=object).astype(str)
        names, ids = np.unique(keys, return_inverse=True)
        return ids.astype(np.int64), tuple(str(n) for n in names)

    def records(self) -> list[dict]:
        """One dict per item: its category, every metadata column and its path."""
        cats = self.categories()
        return [{"category": cat, **meta, "path": str(path)} for cat, meta, path in zip(cats, self.extra, self.paths)]

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

    Hidden files are ignored, and so are files with other extensions, with a warning that counts
    them by extension (e.g. ``.heic ×12``: convert those); empty category folders are skipped.
    Paths are absolute (a collection built from the catalog works from any folder).
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    ignored: dict[str, int] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = []
        for p in sorted(folder.rglob("*")):
            if _is_image_file(p, extensions):
                files.append(p)
            elif p.is_file() and not p.name.startswith("."):
                suffix = p.suffix.lower() or "(no extension)"
                ignored[suffix] = ignored.get(suffix, 0) + 1
        if not files:
            continue
        names.append(folder.name)
        paths.extend(files)
        labels.extend([len(names) - 1] * len(files))
    if ignored:
        counts = ", ".join(f"{suffix} ×{n}" for suffix, n in sorted(ignored.items(), key=lambda kv: -kv[1]))
        warnings.warn(
            f"{root}: {sum(ignored.values())} files are not images fashsim reads and are left out ({counts}); "
            f"it reads {', '.join(sorted(extensions))}: convert the others (e.g. HEIC) to JPEG or PNG",
            stacklevel=2,
        )
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
    keep_columns: bool = False,
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
      one warning that counts them. Paths are absolute (a collection built from the catalog
      works from any folder).
    * ``extra`` holds the other columns; with ``keep_columns`` every column, the category and
      path columns too (all as text).
    """
    csv_path = Path(csv_path).absolute()
    if not csv_path.is_file():
        raise DatasetNotFoundError(f"CSV catalog {csv_path} does not exist")
    rows = _read_csv_rows(csv_path)
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
    image_dir = Path(image_dir).absolute()

    by_stem = _images_by_stem(image_dir) if path_column is None and check_files else {}
    listed = set(by_stem.values())
    paths: list[Path] = []
    categories: list[str] = []
    extra: list[dict] = []
    skipped = {"no category": 0, "missing image": 0, "short row": 0}
    missing: list[str] = []
    joined: list[int] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            row = row[: len(header) - 1] + [",".join(row[len(header) - 1 :])]
            joined.append(line)
        if len(row) < len(header):
            skipped["short row"] += 1
            continue
        record = dict(zip(header, (cell.strip() for cell in row)))
        category = record[category_column] if keep_columns else record.pop(category_column)
        if not category:
            skipped["no category"] += 1
            continue
        if path_column:
            relative = record[path_column] if keep_columns else record.pop(path_column)
        else:  # Kaggle: images/<id>.jpg, or the id with another extension (.JPG, .png, ...)
            relative = f"{record[id_column]}{image_extension}"
            if by_stem and relative not in listed:
                relative = by_stem.get(record[id_column], relative)
        path = Path(relative) if Path(relative).is_absolute() else image_dir / relative
        if "\\" in relative and os.sep == "/" and not path.is_file():  # a catalog written on Windows: pics\a.jpg
            relative = relative.replace("\\", "/")
            path = image_dir / relative
        if check_files and not path.is_file():
            skipped["missing image"] += 1
            missing.append(relative)
            continue
        paths.append(path)
        categories.append(category)
        extra.append(record)
    detail = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
    where = f"; missing under {image_dir}: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
    if not paths:
        raise DatasetFormatError(
            f"{csv_path}: no usable rows (images looked up under {image_dir})"
            + (f": skipped {sum(skipped.values())} rows ({detail}){where if missing else ''}" if detail else "")
        )
    if any(skipped.values()):
        warnings.warn(
            f"{csv_path}: skipped {sum(skipped.values())} rows ({detail}){where if missing else ''}", stacklevel=2
        )
    if joined:
        lines = ", ".join(map(str, joined[:10])) + (" ..." if len(joined) > 10 else "")
        warnings.warn(
            f"{csv_path}: {len(joined)} rows have more fields than the header (lines {lines}); their surplus "
            f"was joined into the last column, {header[-1]!r} — check them if a comma sits in another column",
            stacklevel=2,
        )
    names, labels = np.unique(np.asarray(categories), return_inverse=True)
    return FileCatalog(tuple(paths), labels.astype(np.int64), tuple(str(n) for n in names), tuple(extra))


def _read_csv_rows(csv_path: Path) -> list[list[str]]:
    """The rows of a CSV file: UTF-8 (with or without a byte-order mark) or UTF-16 (with one),
    else Windows-1252 as spreadsheet programs save it (with a warning); the delimiter (``,`` ``;``
    tab ``|``) found from the header line."""
    raw = csv_path.read_bytes()
    try:
        # UTF-16 with its byte-order mark (spreadsheets' "Unicode text"), else UTF-8 with or without one
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            raise DatasetFormatError(
                f"{csv_path} is neither UTF-8 nor Windows-1252 text ({exc}); save it as UTF-8 CSV"
            ) from None
        warnings.warn(f"{csv_path} is not UTF-8 ({exc.reason} at byte {exc.start}): read as Windows-1252", stacklevel=3)
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t|", key=header.count) if header else ","
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))


def _images_by_stem(image_dir: Path) -> dict[str, str]:
    """File name by name-without-extension of the images in ``image_dir`` (one listing, not a
    lookup per row): lets ``<id>.jpg`` be found as ``<id>.JPG`` or ``<id>.png``."""
    if not image_dir.is_dir():
        return {}
    with os.scandir(image_dir) as entries:
        return {
            Path(e.name).stem: e.name
            for e in entries
            if Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and e.is_file()
        }


_INSHOP_PARTITION = "list_eval_partition.txt"


def load_deepfashion_inshop(root: str | os.PathLike, *, partition_file: str | None = None) -> FileCatalog:
    """DeepFashion In-shop Clothes Retrieval: ``root/list_eval_partition.txt`` (or, as the official
    download has it, ``root/Eval/list_eval_partition.txt``; ``partition_file`` names another, relative
    to ``root``) + ``root/img/...``.

    The partition file holds a count line, a header line (``image_name item_id evaluation_status``)
    and one line per image. The category is the path's ``<gender>/<type>`` (e.g. ``WOMEN/Dresses``);
    ``extra`` holds ``item_id`` (the retrieval identity: use :meth:`FileCatalog.group_ids`) and
    ``split`` (train / query / gallery, see :func:`fashsim.data.splits.inshop_split`).
    """
    root = Path(root).absolute()
    if partition_file is None:
        nested = not (root / _INSHOP_PARTITION).is_file() and (root / "Eval" / _INSHOP_PARTITION).is_file()
        partition_file = f"Eval/{_INSHOP_PARTITION}" if nested else _INSHOP_PARTITION
    partition = root / partition_file
    if not partition.is_file():
        raise DatasetNotFoundError(
            f"DeepFashion In-shop: {partition} does not exist"
            + (f" (nor {root / 'Eval' / _INSHOP_PARTITION})" if partition_file == _INSHOP_PARTITION else "")
        )
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


def detect_layout(path: str | os.PathLike) -> str:
    """Which loader a catalog path needs: ``csv`` (a CSV file, or a folder holding ``styles.csv``:
    the Kaggle layout), ``inshop`` (a folder with DeepFashion's ``list_eval_partition.txt`` at its
    top or in ``Eval/``) or ``folder`` (``<category>/<image>`` sub-folders)."""
    path = Path(path)
    if path.is_file():
        if path.name == "list_eval_partition.txt":
            return "inshop"
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DatasetFormatError(f"{path}: a catalog is a CSV file or a folder, not a {path.suffix or 'plain'} file")
    if not path.is_dir():
        raise DatasetNotFoundError(f"catalog {path} does not exist")
    if (path / "styles.csv").is_file():
        return "csv"
    if (path / "list_eval_partition.txt").is_file() or (path / "Eval" / "list_eval_partition.txt").is_file():
        return "inshop"
    return "folder"


def open_catalog(path: str | os.PathLike, **csv_options) -> FileCatalog:
    """Any supported catalog by its path (see :func:`detect_layout`), every CSV column kept as
    metadata: a CSV file with a path (or ``id``) column and a category column (``csv_options`` go
    to :func:`load_csv_catalog`), a Kaggle "Fashion Product Images" folder (``styles.csv`` +
    ``images/<id>.jpg``), a DeepFashion In-shop folder, or an image folder."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "csv":
        csv_path = path / "styles.csv" if path.is_dir() else path
        return load_csv_catalog(csv_path, **{"keep_columns": True, **csv_options})
    if csv_options:
        raise ValueError(f"{path} is a {layout} catalog: CSV options {sorted(csv_options)} do not apply")
    if layout == "inshop":
        root = path.parent if path.is_file() else path
        if path.is_file() and path.parent.name == "Eval":
            root = path.parent.parent
        return load_deepfashion_inshop(root)
    return load_image_folder(path)


class CatalogImages:
    """The catalog's images decoded one at a time in the model's format, for a torch
    ``DataLoader`` with workers: item ``i`` is ``(i, uint8 image, error message or "")``; an
    unreadable file gives a blank image and its error instead of stopping the loader.
    :func:`collate_catalog_batch` batches them."""

    def __init__(self, paths: Sequence[str | os.PathLike], spec: InputSpec) -> None:
        self.paths = [str(p) for p in paths]
        self.spec = spec
        self.shape = (spec.size, spec.size) if spec.channels == 1 else (spec.size, spec.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, str]:
        try:
            return i, prepare_image(load_image(self.paths[i]), self.spec), ""
        except InvalidImageError as exc:
            return i, np.zeros(self.shape, np.uint8), str(exc)
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop a catalog build
            return i, np.zeros(self.shape, np.uint8), f"{self.paths[i]}: {type(exc).__name__}: {exc}"


def collate_catalog_batch(items) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(indices, images uint8 (B, H, W[, C]), errors)`` of a list of :class:`CatalogImages` items."""
    indices, images, errors = zip(*items)
    return np.asarray(indices, np.int64), np.stack(images), list(errors)


def unreadable_report(errors: dict[int, str], total: int, *, limit: int = 20) -> str:
    """A file-by-file message for unreadable catalog images (the first ``limit`` listed)."""
    listed = "\n  ".join(errors[i] for i in sorted(errors)[:limit])
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    return f"{len(errors)} of {total} catalog images cannot be read:\n  {listed}{more}"


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
            f"{len(bad)} of {len(catalog)} catalog images cannot be read; fix or remove them:\n  {listed}"
        )
    return ImageArrayDataset(images, np.asarray(catalog.labels, np.int64), tuple(catalog.class_names), source="catalog")


def image_batches(paths: Sequence, spec: InputSpec, *, workers: int = 2, batch_size: int = 256):
    """The images at ``paths`` in ``spec``'s format, in order, ``batch_size`` at a time, decoded by
    ``workers`` ``DataLoader`` processes: an iterable of :func:`collate_catalog_batch` tuples
    ``(indices, images, errors)`` (an unreadable file: a blank image and its message)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        CatalogImages(paths, spec),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_catalog_batch,
        shuffle=False,
        multiprocessing_context="fork" if workers and os.name != "nt" else None,
    )


def stream_images(
    paths: Sequence[str | os.PathLike],
    spec: InputSpec,
    *,
    workers: int = 2,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "reading images",
) -> tuple[np.ndarray, dict[int, str]]:
    """Every image at ``paths`` in the format ``spec`` describes (uint8, e.g. ``(N, 32, 32, 3)``),
    decoded by ``workers`` DataLoader processes; unreadable files give blank images and an entry
    ``{index: message}`` in the second value."""
    shape = (spec.size, spec.size) if spec.channels == 1 else (spec.size, spec.size, 3)
    images = np.zeros((len(paths), *shape), np.uint8)
    errors: dict[int, str] = {}
    if not len(paths):
        return images, errors
    with tqdm(total=len(paths), desc=desc, disable=not progress, leave=False) as bar:
        for indices, batch, batch_errors in image_batches(paths, spec, workers=workers, batch_size=batch_size):
            images[indices] = batch
            errors.update((int(i), e) for i, e in zip(indices, batch_errors) if e)
            bar.update(len(indices))
    return images, errors
