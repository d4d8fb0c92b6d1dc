"""Your own shop: from a catalog of product photos to a searchable, filterable collection.

:func:`build_shop_collection` takes a catalog — a Kaggle "Fashion Product Images" folder
(``styles.csv`` + ``images/<id>.jpg``), any CSV with a path (or ``id``) and a category column, a
DeepFashion In-shop folder or an image folder (``<category>/<image>``), see
:func:`fashsim.data.catalogs.open_catalog` — and:

1. **streams** the images from disk through a torch ``DataLoader`` with worker processes, in
   chunks cached on disk (``<out>/cache``): a frozen pretrained backbone's features, or the
   small images a CNN trains on. An interrupted build resumes from the chunks already done; no
   more than a batch of full-size photos is ever in memory;
2. reports **unreadable files** one by one and stops, or — with ``skip_unreadable=True`` —
   leaves them out, saying so (never silently);
3. **trains** an RGB embedding where "the same style" is the combination of ``label_columns``
   (default ``articleType`` + ``baseColour`` + ``pattern``; those the catalog lacks are dropped
   with a note): batch-hard triplets on the style plus a cross-entropy head per column
   (:mod:`fashsim.app.shop_train`), resumable;
4. embeds every item and saves ``<out>/model.pt`` and a versioned collection
   ``<out>/collection`` whose records keep **every catalog column** (numbers as numbers), so
   ``Searcher.from_paths(out/"model.pt", out/"collection")`` searches it with filters on any column.

Networks (:data:`RECIPES`; ``backbone=`` picks one): ``small_cnn`` — the default on a CPU: a
small RGB CNN trained from scratch at 32 px on the catalog's own styles (each photo cropped to its
product first, so the product fills the 32 px whatever its size in the photo; bfloat16 where the
CPU has it; each photo embedded with its mirror image) —, ``mobilenet_v2`` and
``efficientnet_lite0`` (the shipped ImageNet weights frozen, their features cached, only the
head trained: an alternative for real photos with few items per style; on a GPU the whole network
is then fine-tuned on the photos, streamed from disk batch by batch — ``fine_tune``). Training
and embedding run on the GPU when there is one (``device="auto"``). RGB models keep the
query's colour: their input format has ``dark_background=False``, so a photo is resized as it is
instead of being turned into a greyscale silhouette (cropped to the product on its plain
background for ``small_cnn``: ``InputSpec.trim_background``).

Command line (see :func:`add_shop_parser`; ``python -m fashsim.app.shop ...`` works the same)::

    python -m fashsim shop generate data/shops/colour-shop
    python -m fashsim shop build data/shops/colour-shop --out data/shops/colour-shop-index
    python -m fashsim shop search data/shops/colour-shop-index photo.jpg --where baseColour=Red --where "price<50"

    # how good is it? keep a fifth of every style out of training, then measure on those items
    python -m fashsim shop build data/shops/colour-shop --out data/shops/measured --hold-out 0.2
    python -m fashsim shop evaluate data/shops/measured
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.catalogs import FileCatalog, open_catalog, stream_images, unreadable_report
from ..data.transforms import IMAGENET_SPEC, InputSpec
from ..errors import FashsimError
from ..fileio import atomic_write_bytes, folder_lock

DEFAULT_LABEL_COLUMNS = ("articleType", "baseColour", "pattern")
MODEL_FILE = "model.pt"
COLLECTION_DIR = "collection"
BUILD_FILE = "build.json"
EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class Recipe:
    """How a backbone is used on a CPU: frozen with cached features, or trained from scratch."""

    frozen: bool
    image_size: int
    seconds: float  # default training budget: at most this long ...
    max_epochs: int  # ... and at most this many epochs, whichever comes first
    lr: float
    p: int
    k: int
    ce_weight: float
    widths: tuple[int, int, int] | None = None  # small_cnn's stage widths
    flip_average: bool = False  # embed a photo and its mirror image, averaged (twice the embedding time)
    trim_background: bool = False  # crop each photo to its product before resizing (InputSpec.trim_background)
    # a pretrained (frozen) recipe on a GPU: after the head, the whole network is fine-tuned on the photos
    fine_tune_seconds: float = 600.0
    fine_tune_epochs: int = 15
    fine_tune_lr: float = 5e-4  # the head's; the backbone's is ShopTrainConfig.backbone_lr_scale × this

    def __post_init__(self) -> None:
        if self.frozen and self.flip_average:  # a frozen build embeds its cached features: no mirror image there
            raise ValueError("flip_average needs a recipe that embeds images (frozen=False)")


#: Per backbone: the CPU recipe measured on the colour shop (``benchmarks/bench_shop.py``). The
#: default, ``small_cnn``, is the course's small CNN (32-64-128) from scratch on 32 px RGB: on the
#: colour shop it beat the frozen ImageNet backbones on every measure at a fraction of their CPU
#: time (frozen ImageNet features lose the garment's kind; a linear probe on them tops out near 0.78
#: category accuracy), and the narrower 16-32-64 one by 4 points of style R@1. Its forward pass
#: runs in bfloat16 where the CPU computes it natively (40 epochs on 10 000 items: 179 s instead of
#: 305 s, the same scores). Measured on the 20 000-item shop and no better than this recipe: 28 px
#: with the epochs that buys, zoom augmentation, a doubled cross-entropy weight; with the photos
#: cropped to the product, also 36 px, a 30 000-item shop in the same time and P×K = 64×4. Flip
#: averaging added 0.002–0.016 style R@1 and 0.015–0.019 MAP@R; cropping each photo to its product
#: (``trim_background``) 0.003–0.013 style R@1 and 0.008–0.013 MAP@R (the benchmark; experiments).
RECIPES: dict[str, Recipe] = {
    "small_cnn": Recipe(
        frozen=False,
        image_size=32,
        seconds=400.0,
        max_epochs=40,
        lr=3e-3,
        p=32,
        k=8,
        ce_weight=1.0,
        flip_average=True,
        trim_background=True,
    ),
    "mobilenet_v2": Recipe(
        frozen=True, image_size=112, seconds=60.0, max_epochs=500, lr=1e-3, p=32, k=8, ce_weight=0.5
    ),
    "efficientnet_lite0": Recipe(
        frozen=True, image_size=112, seconds=60.0, max_epochs=500, lr=1e-3, p=32, k=8, ce_weight=0.5
    ),
}
DEFAULT_BACKBONE = "small_cnn"


# ------------------------------------------------------------------ streaming
def _file_stamp(paths: Sequence[Path]) -> bytes:
    """Path, size and modification time of each file (a changed or replaced image changes it)."""
    parts = []
    for p in paths:
        try:
            st = os.stat(p)
            parts.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{p}|missing")
    return "\n".join(parts).encode()


def stream_chunks(
    paths: Sequence[Path],
    spec: InputSpec,
    cache_dir: str | os.PathLike,
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    transform_key: str = "images",
    chunk_size: int = 2048,
    workers: int = 2,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[np.ndarray, dict[int, str]]:
    """``transform`` (e.g. a frozen backbone's feature extractor) of every image at ``paths``
    in ``spec``'s format (or the images themselves without one), computed ``chunk_size`` images
    at a time and cached in ``cache_dir``, one file per chunk: a second call — after an
    interruption, or for another training run — reads the finished chunks back. A chunk's
    file name hashes its files (path, size, mtime), the format and ``transform_key``. Returns
    the stacked outputs and ``{index: message}`` for unreadable files (their rows are zeros)."""
    from tqdm.auto import tqdm

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    head = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode() + transform_key.encode())
    outputs: list[np.ndarray] = []
    errors: dict[int, str] = {}
    bar = tqdm(total=len(paths), desc=f"{transform_key} (chunks of {chunk_size})", disable=not progress, leave=False)
    for start in range(0, len(paths), chunk_size):
        chunk = list(paths[start : start + chunk_size])
        digest = head.copy()
        digest.update(_file_stamp(chunk))
        file = cache / f"chunk-{start // chunk_size:05d}-{digest.hexdigest()[:16]}.npz"
        if file.is_file():
            try:
                with np.load(file, allow_pickle=False) as saved:
                    values, bad_idx, bad_msg = saved["values"], saved["bad_index"], saved["bad_message"]
                if len(values) == len(chunk):
                    outputs.append(values)
                    errors.update((start + int(i), str(m)) for i, m in zip(bad_idx, bad_msg))
                    bar.update(len(chunk))
                    continue
            except (OSError, ValueError, KeyError):
                pass  # a damaged chunk is recomputed
        images, chunk_errors = stream_images(chunk, spec, workers=workers, batch_size=batch_size)
        values = transform(images) if transform is not None else images
        if chunk_errors:
            values[list(chunk_errors)] = 0
        import io

        buffer = io.BytesIO()
        np.savez(
            buffer,
            values=values,
            bad_index=np.asarray(list(chunk_errors), np.int64),
            bad_message=np.asarray(list(chunk_errors.values()) or [""], dtype=str)[: len(chunk_errors)],
        )
        atomic_write_bytes(file, buffer.getvalue())
        outputs.append(values)
        errors.update((start + i, m) for i, m in chunk_errors.items())
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(outputs) if outputs else np.zeros((0,)), errors


# ------------------------------------------------------------------ records
_NUMBER = re.compile(r"^-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?$")
_GROUPED_NUMBER = re.compile(r"^-?[1-9]\d{0,2}(,\d{3})+(\.\d+)?$")  # 1,299.00 (never 12,50: a decimal comma)


def _is_number(text: str) -> bool:
    return bool(_NUMBER.match(text) or _GROUPED_NUMBER.match(text))


def _typed_columns(rows: list[dict]) -> list[dict]:
    """Columns whose every non-empty value is a number (``1,299.00`` too: thousands separated by
    commas) become numbers (int when all are whole), so filters such as ``price < 50`` compare
    numbers; everything else stays text."""
    columns = {k for row in rows for k in row}
    numeric = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        texts = [v for v in values if isinstance(v, str) and v != ""]
        if texts and len(texts) == sum(v not in (None, "") for v in values) and all(map(_is_number, texts)):
            whole = all(re.match(r"^-?[\d,]+$", v) for v in texts)
            numeric[column] = (lambda v: int(v.replace(",", ""))) if whole else (lambda v: float(v.replace(",", "")))
    return [
        {k: (numeric[k](v) if k in numeric and isinstance(v, str) and v != "" else v) for k, v in row.items()}
        for row in rows
    ]


def mostly_numeric_text_columns(records: Sequence[Mapping]) -> list[str]:
    """Notes on the columns that stayed text although most of their values are numbers (``$49``,
    ``N/A`` among prices): a ``price < 50`` filter cannot use them until those values are fixed."""
    notes = []
    for column in sorted({k for r in records for k, v in r.items() if isinstance(v, str)}):
        texts = [r[column] for r in records if isinstance(r.get(column), str) and r[column] != ""]
        odd = [v for v in texts if not _is_number(v)]
        if texts and 0 < len(odd) <= len(texts) / 2:
            examples = ", ".join(repr(v) for v in list(dict.fromkeys(odd))[:3])
            notes.append(
                f"column {column!r} stays text: {len(odd)} of {len(texts)} values are not plain numbers ({examples}), "
                f"so filters such as {column}<50 cannot use it"
            )
    return notes


def catalog_records(catalog: FileCatalog, indices: Sequence[int], label_columns: Sequence[str]) -> list[dict]:
    """Collection records of the catalog items at ``indices``: ``id`` (the catalog's integer
    ``id`` column when its values are unique integers that fit 64 bits, e.g. Kaggle's, else the
    catalog row), ``source`` (the image path), ``category``, ``style`` (the label columns joined)
    and every catalog column. A catalog column whose name the record uses for something else keeps
    its values under ``catalog_<name>`` (a non-integer ``id`` column: ``catalog_id``; a CSV
    column ``style`` or ``source``, or ``category`` when another column is the category)."""
    base = catalog.records()
    rows = _typed_columns([dict(base[i]) for i in indices])
    ids = [row.get("id") for row in rows]
    use_own = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in ids) and len(
        set(ids)
    ) == len(ids)
    records = []
    for i, row in zip(indices, rows):
        record = {k: v for k, v in row.items() if k not in ("id", "path")}
        record["id"] = row["id"] if use_own else int(i)
        record["source"] = row["path"]
        record["category"] = str(catalog.class_names[catalog.labels[i]])
        record["style"] = " / ".join("" if row.get(c) is None else str(row.get(c)) for c in label_columns)
        for name in ("id", "source", "category", "style"):  # row holds the catalog's own columns of these names
            if name in catalog.extra[i] and row[name] not in (None, "") and row[name] != record[name]:
                record[f"catalog_{name}"] = row[name]
        records.append(record)
    return records


def resolve_label_columns(catalog: FileCatalog, label_columns: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The requested label columns the catalog has (``category`` if none), and those it lacks."""
    wanted = list(label_columns or DEFAULT_LABEL_COLUMNS)
    available = set(catalog.columns())
    present = [c for c in wanted if c in available]
    return (present or ["category"]), [c for c in wanted if c not in available]


# ------------------------------------------------------------------ the build
@dataclass
class ShopBuild:
    """What :func:`build_shop_collection` made: paths, the model and collection, and per item
    (``indices``: catalog rows in the collection, in order) its embedding and record."""

    out_dir: Path
    model_path: Path
    collection_dir: Path
    model: object
    collection: object
    catalog: FileCatalog
    indices: np.ndarray
    embeddings: np.ndarray
    records: list[dict]
    label_columns: list[str]
    unreadable: dict[int, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def positions(self, catalog_indices: Sequence[int]) -> np.ndarray:
        """Positions in :attr:`records` / :attr:`embeddings` of catalog rows (rows left out as
        unreadable are dropped)."""
        where = {int(i): n for n, i in enumerate(self.indices)}
        return np.asarray([where[int(i)] for i in catalog_indices if int(i) in where], np.int64)

    def searcher(self, **kwargs):
        """A :class:`~fashsim.search.searcher.Searcher` over this build."""
        from ..search.searcher import Searcher

        return Searcher(self.model, self.collection, **kwargs)


def _input_spec(backbone: str, recipe: Recipe, image_size: int | None) -> InputSpec:
    from ..model.input_format import default_input_spec

    size = image_size or recipe.image_size
    if recipe.frozen:
        spec = replace(default_input_spec(backbone, "shipped"), size=size, dark_background=False)
    else:
        spec = replace(IMAGENET_SPEC, size=size)  # RGB from scratch: ImageNet statistics, BatchNorm does the rest
    return replace(spec, trim_background=recipe.trim_background)


def _one_build_per_folder(build: Callable) -> Callable:
    """Let one build at a time write to an output folder (two would mix their chunks and models)."""

    @functools.wraps(build)
    def claimed(catalog_or_path, out_dir, *args, **kwargs):
        with folder_lock(out_dir, "shop build", "wait for it to finish, or build into another folder"):
            return build(catalog_or_path, out_dir, *args, **kwargs)

    return claimed


@_one_build_per_folder
def build_shop_collection(
    catalog_or_path: FileCatalog | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label_columns: Sequence[str] | None = DEFAULT_LABEL_COLUMNS,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int | None = None,
    multi_scale: bool = False,
    embedding_dim: int = 128,
    train_seconds: float | None = None,
    max_epochs: int | None = None,
    train_indices: Sequence[int] | None = None,
    hold_out: float = 0.0,
    skip_unreadable: bool = False,
    kind: str = "auto",
    workers: int = 2,
    batch_size: int = 128,
    chunk_size: int = 2048,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    threads: int | None = None,
    train_options: Mapping | None = None,
    csv_options: Mapping | None = None,
    device: str = "auto",
    fine_tune: bool | None = None,
) -> ShopBuild:
    """Catalog → trained RGB embedding → saved, searchable collection (see the module docstring).

    ``train_indices``: the catalog rows the model may learn from (default: all); every readable
    item is indexed either way — pass a split's train rows to evaluate on the others.
    ``hold_out``: instead, keep this share of every style out of training (e.g. 0.2), so that
    :func:`evaluate_shop_build` can measure the search on items the model never learnt from.
    ``train_seconds`` and ``max_epochs`` (default: the recipe's) bound the training, whichever is
    reached first (train longer: raise both); ``train_options`` overrides
    :class:`~fashsim.app.shop_train.ShopTrainConfig` fields; ``resume=False`` ignores cached
    chunks and checkpoints. ``csv_options`` go to :func:`~fashsim.data.catalogs.load_csv_catalog`.

    ``device``: ``auto`` (a CUDA GPU when there is one, else the CPU), ``cuda`` or ``cpu``.
    ``fine_tune`` (pretrained backbones; default: on a GPU only): after the head has learnt on the
    cached features, fine-tune the whole network on the photos, decoded from disk batch by batch
    (the recipe's ``fine_tune_*`` budget; ``train_seconds`` / ``max_epochs`` then bound this
    phase), and embed the catalog with it.
    """
    import torch

    from ..model.inference import embed_arrays, embed_image_files
    from ..model.networks import EmbeddingNet
    from ..model.persistence import fingerprint, save_model
    from ..search.collection import Collection
    from .shop_train import ShopTrainConfig, train_shop_model

    if backbone not in RECIPES:
        raise ValueError(f"unknown backbone {backbone!r} for a shop; choose one of {', '.join(RECIPES)}")
    if not 0.0 <= hold_out < 1.0:
        raise ValueError(
            f"hold_out is the share of every style kept out of training: 0 <= hold_out < 1, got {hold_out}"
        )
    if hold_out and train_indices is not None:
        raise ValueError("give train_indices or hold_out, not both")
    if train_seconds is not None and not train_seconds > 0:
        raise ValueError(f"train_seconds must be > 0, got {train_seconds}")
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"max_epochs must be ≥ 1, got {max_epochs}")
    from ..train.device import select_device

    torch_device = select_device(device)
    if fine_tune is None:
        fine_tune = RECIPES[backbone].frozen and torch_device.type == "cuda"
    elif fine_tune and not RECIPES[backbone].frozen:
        raise ValueError(
            f"{backbone} trains every layer from scratch already; fine_tune applies to the pretrained "
            f"backbones ({', '.join(name for name, r in RECIPES.items() if r.frozen)})"
        )
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if isinstance(catalog_or_path, FileCatalog):
        catalog = catalog_or_path
    else:
        with warnings.catch_warnings(record=True) as caught:  # skipped rows, encoding: into build.json too
            warnings.simplefilter("always")
            try:
                catalog = open_catalog(catalog_or_path, **(csv_options or {}))
            except FashsimError as exc:  # what the loader noticed on the way is often the clue
                if caught:
                    raise type(exc)(f"{exc}\n" + "\n".join(f"note: {w.message}" for w in caught)) from None
                raise
        for warning in caught:
            notes.append(str(warning.message))
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    columns, missing = resolve_label_columns(catalog, label_columns)
    _check_trainable(catalog, columns, kind)
    if missing:
        notes.append(f"label columns {missing} are not in the catalog: 'the same style' = {' + '.join(columns)}")
        print("note: " + notes[-1], flush=True)
    recipe = RECIPES[backbone]
    spec = _input_spec(backbone, recipe, image_size)
    torch.manual_seed(seed)
    model = EmbeddingNet(
        backbone,
        embedding_dim=embedding_dim,
        in_channels=3,
        weights="shipped" if recipe.frozen else None,
        input_spec=spec,
        multi_scale=multi_scale and recipe.frozen,
        backbone_widths=recipe.widths,
        flip_average=recipe.flip_average,
    )
    timings["catalog"] = time.perf_counter() - t0

    # 1. stream: frozen features, or the small images a CNN trains on (chunked, cached, resumable)
    from .shop_train import auto_threads, torch_threads

    t = time.perf_counter()
    with torch_threads(threads or auto_threads()):
        cache = out / "cache"
        if not resume:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
            for name in ("checkpoint.pt", "fine_tune.pt"):
                (out / "train" / name).unlink(missing_ok=True)
        if recipe.frozen:
            from ..model.inference import extract_features
            from ..model.persistence import hash_weights

            extractor = model.backbone.eval().to(torch_device, memory_format=torch.channels_last)
            digest = hashlib.sha256(f"{backbone}|multi_scale={multi_scale}".encode())
            hash_weights(digest, extractor)
            folder = "features"
            transform_key = f"features-{digest.hexdigest()[:12]}"

            def transform(images):
                return extract_features(
                    extractor, images, spec, batch_size=batch_size, device=torch_device, progress=False
                )

        else:
            folder = transform_key = "images"
            transform = None  # the images themselves, in the model's input format
        inputs, errors = stream_chunks(
            catalog.paths,
            spec,
            cache / folder,
            transform=transform,
            transform_key=transform_key,
            chunk_size=chunk_size,
            workers=workers,
            batch_size=batch_size,
            progress=progress,
        )
    timings["stream"] = time.perf_counter() - t

    # 2. unreadable files: reported file by file; left out only on request
    if errors:
        message = unreadable_report(errors, len(catalog))
        if not skip_unreadable:
            raise FashsimError(
                message + "\nfix or remove them, or build without them: skip_unreadable=True "
                "(command line: --skip-unreadable)"
            )
        warnings.warn(f"{message}\nthese {len(errors)} items are left out of the collection", stacklevel=2)
        notes.append(f"{len(errors)} unreadable images left out (listed in {BUILD_FILE})")
    keep = np.asarray([i for i in range(len(catalog)) if i not in errors], np.int64)
    if len(keep) < 2:
        raise FashsimError(f"only {len(keep)} readable images in the catalog: nothing to search")

    # 3. labels and training
    t = time.perf_counter()
    kept = catalog.subset(keep)
    style, style_names = kept.combined_labels(columns)
    aux = {c: np.unique(kept.column(c), return_inverse=True)[1] for c in columns} if len(columns) > 1 else {}
    trainable = np.arange(len(keep))
    if train_indices is not None:
        trainable = np.flatnonzero(np.isin(keep, np.asarray(train_indices, np.int64)))
    elif hold_out:
        from ..evaluation.shop import smallest_style_held_out, stratified_hold_out

        trainable = np.setdiff1d(trainable, stratified_hold_out(style, hold_out, seed=seed))
        if len(trainable) == len(keep):
            notes.append(
                f"hold_out={hold_out} kept nothing out of training: a style needs at least "
                f"{smallest_style_held_out(hold_out)} items to lend one"
            )
            print("note: " + notes[-1], flush=True)
    if len(trainable) < 2:
        raise FashsimError(f"only {len(trainable)} items to train on: hold fewer out")
    r = recipe
    budget = {  # the user's budget bounds the phase that trains the backbone: fine-tuning, when there is one
        "seconds": r.seconds if fine_tune or train_seconds is None else train_seconds,
        "max_epochs": r.max_epochs if fine_tune or max_epochs is None else max_epochs,
    }
    config = ShopTrainConfig(
        **{
            **budget,
            "lr": r.lr,
            "p": r.p,
            "k": r.k,
            "ce_weight": r.ce_weight,
            "seed": seed,
            "threads": threads,
            "workers": workers,
            **dict(train_options or {}),
        }
    )
    kept_inputs = inputs[keep]
    labels = (style[trainable], {c: v[trainable] for c, v in aux.items()})
    (out / "train").mkdir(exist_ok=True)
    trained = train_shop_model(
        model,
        kept_inputs[trainable],
        *labels,
        frozen=recipe.frozen,
        config=config,
        checkpoint=out / "train" / "checkpoint.pt",
        progress=progress,
        device=torch_device,
    )
    kept_paths = [catalog.paths[i] for i in keep]
    fine_tuned = None
    if fine_tune:  # the head has learnt on the cached features; now the whole network, on the photos
        from ..data.catalogs import CatalogImages

        fine_config = replace(
            config,
            seconds=train_seconds if train_seconds is not None else r.fine_tune_seconds,
            max_epochs=max_epochs if max_epochs is not None else r.fine_tune_epochs,
            lr=dict(train_options or {}).get("lr", r.fine_tune_lr),
        )
        fine_tuned = train_shop_model(
            model,
            CatalogImages([kept_paths[i] for i in trainable], spec),
            *labels,
            frozen=False,
            config=fine_config,
            checkpoint=out / "train" / "fine_tune.pt",
            progress=progress,
            device=torch_device,
            heads_from=out / "train" / "checkpoint.pt",  # the classifiers the head's phase trained
        )
    timings["train"] = time.perf_counter() - t

    # 4. embed, index, save
    t = time.perf_counter()
    model.eval()
    with torch_threads(threads or auto_threads()):
        if fine_tune:  # the backbone changed: its cached features are stale, the photos are read again
            embeddings = embed_image_files(
                model, kept_paths, batch_size=batch_size, workers=workers, device=torch_device, progress=progress
            )
        elif recipe.frozen:
            with torch.inference_mode():
                feats = torch.from_numpy(np.ascontiguousarray(kept_inputs, dtype=np.float32)).to(torch_device)
                embeddings = torch.nn.functional.normalize(model.head(feats).float(), dim=1).cpu().numpy()
        else:
            embeddings = embed_arrays(model, kept_inputs, batch_size=512, device=torch_device)
    model.cpu()  # saved, fingerprinted and searched from the CPU
    timings["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    records = catalog_records(catalog, keep, columns)
    for note in mostly_numeric_text_columns(records):
        notes.append(note)
        print("note: " + note, flush=True)
    model_fp = fingerprint(model)
    collection = Collection.build(embeddings, records, kind=kind, model_fingerprint=model_fp)
    model_path = out / MODEL_FILE
    save_model(
        model,
        model_path,
        shop={
            "label_columns": columns,
            "backbone": backbone,
            "styles": len(style_names),
            "items": int(len(keep)),
            "train_items": int(len(trainable)),
        },
    )
    collection_dir = out / COLLECTION_DIR
    collection.save(collection_dir)
    timings["index"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    summary = {
        "catalog": str(catalog_or_path) if not isinstance(catalog_or_path, FileCatalog) else "FileCatalog",
        "items": int(len(catalog)),
        "indexed": int(len(keep)),
        "trained_on": int(len(trainable)),
        "hold_out": hold_out,
        # indexed but never trained on: what evaluate_shop_build measures (record ids)
        "held_out_ids": [int(records[n]["id"]) for n in np.setdiff1d(np.arange(len(keep)), trainable)],
        "label_columns": columns,
        "styles": len(style_names),
        "backbone": backbone,
        "frozen": recipe.frozen,
        "image_size": spec.size,
        "multi_scale": bool(multi_scale and recipe.frozen),
        "model": str(model_path),
        "collection": str(collection_dir),
        "model_fingerprint": model_fp,
        "device": torch_device.type,
        "fine_tuned": bool(fine_tune),
        "train": _training_summary(trained, config),
        **({"fine_tune": _training_summary(fine_tuned, fine_config)} if fine_tune else {}),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        # photo file -> vector: decoding, resizing and the network (a frozen backbone runs while streaming)
        "embed_images_per_second": round(len(catalog) / max(timings["stream"] + timings["embed"], 1e-9), 1),
        "unreadable": [errors[i] for i in sorted(errors)],
        "notes": notes,
    }
    atomic_write_bytes(out / BUILD_FILE, json.dumps(summary, indent=2).encode())
    return ShopBuild(
        out,
        model_path,
        collection_dir,
        model,
        collection,
        catalog,
        keep,
        embeddings,
        records,
        columns,
        dict(errors),
        summary,
    )


def _training_summary(trained: Mapping, config) -> dict:
    """What build.json keeps of a training run: its state, the last loss and its settings."""
    return {k: v for k, v in trained.items() if k != "losses"} | {
        "last_loss": (trained.get("losses") or [None])[-1],
        "config": config.to_dict(),
    }


def _check_trainable(catalog: FileCatalog, columns: Sequence[str], kind: str) -> None:
    """Refuse, before any image is read, a catalog that cannot make a collection of ``kind``
    or whose items all share one style (nothing to learn to tell apart)."""
    from ..search.index import minimum_items

    _, styles = catalog.combined_labels(columns)
    if len(styles) < 2:
        raise FashsimError(
            f"every item of the catalog has the same {' + '.join(columns)} ({styles[0]!r}): similarity is "
            "learnt by telling styles apart, so a shop needs at least two (an image folder: one sub-folder per "
            "category; a CSV: choose label columns that differ, --label-columns)"
        )
    if len(catalog) < minimum_items(kind):
        raise FashsimError(
            f"a {kind!r} index needs at least {minimum_items(kind)} items and the catalog has {len(catalog)}: "
            "use kind 'flat' (exact; the default 'auto' picks it for small catalogs) or 'hnsw'"
        )


def evaluate_shop_build(
    out_dir: str | os.PathLike,
    *,
    baselines: Sequence[str] | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """How well a shop built with a hold-out (``hold_out=``, ``--hold-out``) searches: each
    held-out item queries the others (leave-one-out; relevant = the same style, the build's label
    columns), next to the ``baselines`` (default: all of
    :data:`~fashsim.evaluation.shop.BASELINES`), and also among every catalog item as the shop's
    search runs (``catalog``). Uses the vectors stored in the collection; writes the report
    (:func:`~fashsim.evaluation.shop.evaluate_shop`'s, plus ``table``) to ``<out>/evaluation.json``."""
    from ..evaluation.shop import BASELINES, comparison_rows, evaluate_shop, smallest_style_held_out
    from ..search.collection import Collection

    out = Path(out_dir)
    try:
        summary = json.loads((out / BUILD_FILE).read_text())
    except FileNotFoundError:
        raise FashsimError(
            f"{out} holds no shop build ({BUILD_FILE} is missing): run `fashsim shop build` first"
        ) from None
    held_out = summary.get("held_out_ids") or []
    if len(held_out) < 2 and summary.get("hold_out"):
        raise FashsimError(
            f"the shop in {out} kept {len(held_out)} items out of training (hold_out={summary['hold_out']}): "
            "too few to measure; its styles have too few items each (see the notes in build.json)"
        )
    if len(held_out) < 2:
        raise FashsimError(
            f"the shop in {out} was trained on every item: searching among items the model learnt measures "
            "its memory, not its search. Build it again keeping some out of training: --hold-out 0.2 "
            "(hold_out=0.2), then evaluate"
        )
    collection = Collection.load(out / COLLECTION_DIR)
    ids = collection.index.ids()
    records = collection.metadata.get(ids)
    position = {int(i): n for n, i in enumerate(ids)}
    test = np.asarray(sorted(position[i] for i in held_out if i in position), np.int64)
    report = evaluate_shop(
        collection.index.reconstruct(ids),
        records,
        [r["source"] for r in records],
        {"train": np.setdiff1d(np.arange(len(ids)), test), "test": test},
        summary["label_columns"],
        baselines=BASELINES if baselines is None else tuple(baselines),
        workers=workers,
        progress=progress,
    )
    report["table"] = comparison_rows(report)
    if not report["methods"]["trained"]["test"].get("style_queries") and summary.get("hold_out"):
        fraction = summary["hold_out"]
        pair = smallest_style_held_out(fraction, held=2)
        report["notes"].append(
            "no held-out item has another item of its style among the held-out ones, so the style scores among "
            f"them are None: with --hold-out {fraction:g} a style needs {pair} items or more for two to be held "
            "out (hold out more, or label coarser styles); the category and per-column scores, and the search "
            "among every catalog item, are measured all the same"
        )
    atomic_write_bytes(out / EVALUATION_FILE, json.dumps(report, indent=2).encode())
    return report


def open_shop(out_dir: str | os.PathLike, **kwargs):
    """The :class:`~fashsim.search.searcher.Searcher` of a shop built into ``out_dir``."""
    from ..search.collection import IndexMismatchError
    from ..search.searcher import Searcher

    out = Path(out_dir)
    if not (out / MODEL_FILE).is_file() or not (out / COLLECTION_DIR).is_dir():
        raise FashsimError(
            f"{out} holds no shop build (no {MODEL_FILE} and {COLLECTION_DIR}/ in it): build one with "
            f"`python -m fashsim shop build CATALOG --out {out}`"
        )
    try:
        return Searcher.from_paths(out / MODEL_FILE, out / COLLECTION_DIR, **kwargs)
    except IndexMismatchError as exc:  # e.g. a build interrupted between saving the model and the collection
        raise IndexMismatchError(
            f"{out}: the collection was not built with this model ({exc}); rebuild the shop with "
            f"`python -m fashsim shop build CATALOG --out {out}`"
        ) from None


# ------------------------------------------------------------------ command line
def _cmd_generate(args) -> int:
    from ..data.colour_shop import generate_colour_shop

    path = generate_colour_shop(
        args.out,
        size=args.size,
        image_size=args.image_size,
        seed=args.seed,
        colours=args.colours,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(f"colour shop: {args.size} items -> {path}")
    return 0


def _cmd_build(args) -> int:
    csv_options = {
        k: v
        for k, v in (
            ("category_column", args.category_column),
            ("path_column", args.path_column),
            ("id_column", args.id_column),
            ("image_dir", args.image_dir),
        )
        if v
    }
    build = build_shop_collection(
        args.catalog,
        args.out,
        label_columns=args.label_columns,
        backbone=args.backbone,
        image_size=args.image_size,
        train_seconds=args.train_seconds,
        max_epochs=args.max_epochs,
        hold_out=args.hold_out,
        skip_unreadable=args.skip_unreadable,
        kind=args.kind,
        workers=args.workers,
        resume=not args.fresh,
        progress=not args.quiet,
        csv_options=csv_options or None,
        device=args.device,
        fine_tune=args.fine_tune,
    )
    s = build.summary
    print(
        f"indexed {s['indexed']} of {s['items']} items ({s['styles']} styles of {' + '.join(s['label_columns'])}) "
        f"in {s['seconds']['total']:.0f} s\n  model:      {build.model_path}\n  collection: {build.collection_dir}"
    )
    if s["held_out_ids"]:
        print(f"  {len(s['held_out_ids'])} items kept out of training: fashsim shop evaluate {args.out}")
    return 0


def _cmd_evaluate(args) -> int:
    from .report import markdown_table

    report = evaluate_shop_build(args.shop, baselines=args.baselines, workers=args.workers, progress=not args.quiet)
    sizes = report["sizes"]
    print(
        f"{sizes['test']} held-out items, each searching the others (the same style = "
        f"{' + '.join(report['label_columns'])}):\n"
    )
    print(markdown_table(report["table"]))
    catalog = report["methods"]["trained"]["catalog"]
    scores = {name: catalog.get(f"{name}_recall@1") for name in ("style", "category")}
    print(
        "\namong every catalog item, as the shop searches: "
        + ", ".join(f"{name} R@1 {'-' if value is None else f'{value:.3f}'}" for name, value in scores.items())
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"-> {Path(args.shop) / EVALUATION_FILE}")
    return 0


def _cmd_search(args) -> int:
    from ..search.filters import parse_conditions

    searcher = open_shop(args.shop, threads=1)
    searcher.require_category(args.category)
    where = parse_conditions(args.where, searcher.collection.metadata.field_kinds()) if args.where else None
    hits = searcher.search(args.image, k=args.k, category=args.category, where=where)
    if not hits and (where or args.category):
        asked = [*(args.where or []), *([f"category={args.category}"] if args.category else [])]
        print(
            f"no item matches {' and '.join(asked)} (values compare exactly: 'Red' is not 'red'; "
            "several --where must all hold)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
    else:
        for hit in hits:
            extra = ", ".join(f"{k}={hit.extra[k]}" for k in ("style", "price") if k in hit.extra)
            print(f"{hit.rank:3d}  {hit.score:.4f}  {hit.category:14s}  {extra}  {hit.source}")
    return 0


def add_shop_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``shop generate | build | search | evaluate`` to a CLI's subparsers (``python -m fashsim shop ...``)."""
    from ..data.colour_shop import DEFAULT_COLOURS, DEFAULT_SIZE

    shop = subparsers.add_parser("shop", help="your own shop: a photo catalog -> a searchable collection")
    sub = shop.add_subparsers(dest="shop_command", required=True)

    gen = sub.add_parser("generate", help="write the generated colour shop (Kaggle layout: styles.csv + images/)")
    gen.add_argument("out", help="folder to write")
    gen.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"number of items (default {DEFAULT_SIZE})")
    gen.add_argument("--image-size", type=int, default=96, help="photo size in pixels (default 96)")
    gen.add_argument(
        "--colours", type=int, default=DEFAULT_COLOURS, help=f"number of colours (default {DEFAULT_COLOURS})"
    )
    gen.add_argument("--seed", type=int, default=0, help="the catalog follows from it (default 0)")
    gen.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_cmd_generate)

    build = sub.add_parser("build", help="train an RGB embedding on a catalog and save a searchable collection")
    build.add_argument(
        "catalog",
        help="Kaggle folder (styles.csv + images/), a CSV file, a DeepFashion In-shop "
        "folder or an image folder (<category>/<image>)",
    )
    build.add_argument("--out", required=True, help="output folder (model.pt, collection/, cache/, build.json)")
    build.add_argument(
        "--label-columns",
        nargs="+",
        default=list(DEFAULT_LABEL_COLUMNS),
        metavar="COLUMN",
        help="columns whose combination is 'the same style' (default: articleType baseColour "
        "pattern; those missing are dropped)",
    )
    build.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=list(RECIPES))
    build.add_argument("--image-size", type=int, help="network input size (default: the recipe's)")
    build.add_argument(
        "--train-seconds",
        type=float,
        help="training budget in seconds (default: the recipe's; small_cnn: 40 epochs or 400 s, whichever comes first)",
    )
    build.add_argument(
        "--max-epochs",
        type=int,
        help="at most this many epochs (default: the recipe's; small_cnn 40): to train longer, raise it with --train-seconds",
    )
    build.add_argument(
        "--hold-out",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="keep this share of every style out of training, to measure the search with "
        "`fashsim shop evaluate` (e.g. 0.2; default 0: train on every item)",
    )
    build.add_argument("--skip-unreadable", action="store_true", help="leave unreadable images out (listed)")
    build.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "hnsw", "ivfpq"],
        help="FAISS index kind (default auto: exact below 200 000 items, then HNSW; see fashsim.search.index.choose_kind)",
    )
    build.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")
    build.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to train and embed (default auto: a CUDA GPU when there is one)",
    )
    build.add_argument(
        "--fine-tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pretrained backbones: after the head, fine-tune the whole network on the photos (default: on a GPU "
        "only; --train-seconds and --max-epochs then bound this phase)",
    )
    build.add_argument("--category-column", help="CSV: the category column (default: category/articleType/...)")
    build.add_argument("--path-column", help="CSV: the image path column (default: path/image/filename/...)")
    build.add_argument(
        "--id-column",
        help="CSV without a path column: the column naming each image <image-dir>/<value>.jpg (default: id); "
        "it is kept as metadata, while item ids come from an integer 'id' column, else the row number",
    )
    build.add_argument("--image-dir", help="CSV: the folder image paths are relative to")
    build.add_argument("--fresh", action="store_true", help="ignore cached features and checkpoints")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_cmd_build)

    search = sub.add_parser("search", help="search a built shop with an image, optionally filtered")
    search.add_argument("shop", help="the --out folder of `shop build`")
    search.add_argument("image", help="an image file")
    search.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    search.add_argument("--category", help="only items of this category")
    search.add_argument(
        "--where",
        action="append",
        metavar="CONDITION",
        help="filter on any column, e.g. baseColour=Red or 'price<50' (repeatable)",
    )
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.set_defaults(func=_cmd_search)

    from ..evaluation.shop import BASELINES

    evaluate = sub.add_parser(
        "evaluate", help="measure a shop built with --hold-out on its held-out items, next to baselines"
    )
    evaluate.add_argument("shop", help="the --out folder of `shop build --hold-out ...`")
    evaluate.add_argument(
        "--baselines",
        nargs="*",
        choices=list(BASELINES),
        default=list(BASELINES),
        metavar="NAME",
        help=f"baselines to compare with (default: all: {' '.join(BASELINES)}; --baselines alone: none)",
    )
    evaluate.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=_cmd_evaluate)
    return shop


def main_build(argv: Sequence[str] | None = None) -> int:
    """``python -m fashsim.app.shop {generate,build,search,evaluate} ...``: ``fashsim shop ...``
    itself (the same parser, messages and exit codes)."""
    from .cli import main

    return main(["shop", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main_build())
