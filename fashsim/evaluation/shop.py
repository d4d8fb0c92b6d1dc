"""Evaluating photo search on a shop catalog (the generated colour shop, or your own).

Relevance is **the same style**: the combination of the label columns (by default
``articleType`` + ``baseColour`` + ``pattern``). Next to the style's Recall@K / MAP@R, each label
column gets its own match rate: ``<column>-match@K`` is the mean share of a query's top-K results
that share its value (colour-match@5 = 0.99: 99 % of the first five results have the query's
colour), plus that column's own Recall@1 (e.g. category R@1).

* :func:`shop_split` — items held out of training (``test``), and an **open set** of style
  combinations never seen in training (``unseen``: e.g. every checked dress), which the model
  knows only as parts (checked things, dresses).
* :func:`shop_metrics` — all of the above, leave-one-out within a set of items, or for some
  queries only (the open set, searched among every evaluated item).
* :func:`baseline_embeddings` — the comparison points: a colour histogram (8×8×8 RGB bins), raw
  pixels (32×32 RGB), frozen ImageNet features without a trained head, and the greyscale
  Fashion-MNIST model (shape only, no colour).
* :func:`evaluate_shop` — the trained model and every baseline side by side, as one JSON-able dict.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import DatasetFormatError
from . import metrics

#: Style combinations held out of training in the colour shop's open-set split (any column → value).
DEFAULT_OPEN_SET: tuple[dict[str, str], ...] = (
    {"articleType": "Dresses", "pattern": "Checked"},
    {"articleType": "Sports Shoes", "pattern": "Striped"},
    {"articleType": "Jackets", "pattern": "Polka Dot"},
    {"articleType": "Trousers", "baseColour": "Red"},
    {"articleType": "Handbags", "baseColour": "Yellow"},
)
BASELINES = ("colour_histogram", "raw_pixels", "frozen_imagenet", "greyscale_fashion_mnist")


def _column(records: Sequence[Mapping], name: str) -> np.ndarray:
    return np.asarray(["" if r.get(name) is None else str(r.get(name)) for r in records], dtype=object).astype(str)


def style_labels(records: Sequence[Mapping], columns: Sequence[str], *, sep: str = " / ") -> np.ndarray:
    """Integer labels of the combination of ``columns`` in each record."""
    keys = [sep.join(parts) for parts in zip(*(_column(records, c) for c in columns))]
    return np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1].astype(np.int64)


def held_out_count(test_fraction: float, members: int) -> int:
    """How many of a style's ``members`` items :func:`shop_split` holds out: ``test_fraction`` of
    them rounded, at most all but one (none of a style with a single item)."""
    take = int(round(test_fraction * members))
    return min(take, members - 1) if members >= 2 else 0


def smallest_style_held_out(test_fraction: float, held: int = 1) -> int:
    """The fewest items a style needs for :func:`held_out_count` to hold ``held`` of them out
    (``test_fraction`` > 0)."""
    return next(n for n in itertools.count(2) if held_out_count(test_fraction, n) >= held)


def stratified_hold_out(styles: np.ndarray, test_fraction: float, *, seed: int = 0) -> np.ndarray:
    """Sorted positions of the items held out of training: :func:`held_out_count` of every style
    in ``styles`` (integer labels), drawn at random (``seed``)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(styles), bool)
    for s in np.unique(styles):
        members = np.flatnonzero(styles == s)
        take = held_out_count(test_fraction, len(members))
        if take:
            held[rng.choice(members, take, replace=False)] = True
    return np.flatnonzero(held)


def shop_split(
    records: Sequence[Mapping],
    label_columns: Sequence[str],
    *,
    test_fraction: float = 0.2,
    open_set: Sequence[Mapping[str, str]] = DEFAULT_OPEN_SET,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Indices of ``train``, ``test`` (a stratified share of every seen style) and ``unseen``
    (every item matching one of the ``open_set`` combinations: never trained on).

    Open-set rules naming a column the records lack are ignored (e.g. ``pattern`` on a catalog
    without one)."""
    n = len(records)
    unseen = np.zeros(n, bool)
    columns = set().union(*(r.keys() for r in records)) if n else set()
    for rule in open_set:
        if not rule or not set(rule) <= columns:
            continue
        match = np.ones(n, bool)
        for column, value in rule.items():
            match &= _column(records, column) == str(value)
        unseen |= match
    seen = np.flatnonzero(~unseen)
    test = np.zeros(n, bool)
    if test_fraction > 0 and len(seen):
        styles = style_labels([records[i] for i in seen], label_columns)
        test[seen[stratified_hold_out(styles, test_fraction, seed=seed)]] = True
    return {"train": np.flatnonzero(~unseen & ~test), "test": np.flatnonzero(test), "unseen": np.flatnonzero(unseen)}


def shop_metrics(
    embeddings: np.ndarray,
    records: Sequence[Mapping],
    label_columns: Sequence[str],
    *,
    ks: Sequence[int] = (1, 5, 10),
    queries: np.ndarray | None = None,
    category_column: str | None = None,
) -> dict[str, float]:
    """Style Recall@K, MAP@R and R-precision, plus ``<column>-match@K`` and ``<column> R@1`` for
    every label column, leave-one-out among ``embeddings`` (one per record). ``queries``: rows
    that query (default all); the others are gallery only. ``category_column`` (default: the
    records' ``category``, the catalog's category, where they all have one, else the first label
    column) is reported as ``category_recall@1``."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(x)
    rows = np.arange(n) if queries is None else np.asarray(queries, np.int64)
    style = style_labels(records, label_columns)
    per_column = {c: _column(records, c) for c in label_columns}
    depth = int(max(max(ks), np.bincount(style).max()))
    _, idx = metrics._search(metrics.exact_index(x), x[rows], min(depth, n - 1), rows)
    out: dict[str, float] = {"queries": int(len(rows)), "gallery": int(n)}
    relevant = np.bincount(style, minlength=style.max() + 1)[style[rows]] - 1
    hits = style[idx] == style[rows, None]
    ok = relevant > 0  # queries whose style has another item in the gallery (the others are not counted)
    out["style_queries"] = int(ok.sum())
    ranks = np.arange(1, hits.shape[1] + 1)
    hits_r = hits[ok] & (ranks[None, :] <= relevant[ok, None])
    for k in ks:
        out[f"style_recall@{k}"] = float(hits[ok, :k].any(1).mean()) if ok.any() else None
    out["style_r_precision"] = float((hits_r.sum(1) / relevant[ok]).mean()) if ok.any() else None
    out["style_map@r"] = (
        float(((np.cumsum(hits_r, 1) / ranks * hits_r).sum(1) / relevant[ok]).mean()) if ok.any() else None
    )
    for column, values in per_column.items():
        same = values[idx] == values[rows, None]
        out[f"{column}_recall@1"] = float(same[:, 0].mean())
        for k in ks:
            out[f"{column}_match@{k}"] = float(same[:, :k].mean())
    if category_column is None:  # the catalog's category (a build's records carry it), else the first label
        category_column = "category" if all("category" in r for r in records) else label_columns[0]
    if category_column in per_column:
        out["category_recall@1"] = out[f"{category_column}_recall@1"]
    elif all(category_column in r for r in records):
        category = _column(records, category_column)
        out["category_recall@1"] = float((category[idx[:, 0]] == category[rows]).mean())
    return out


# ------------------------------------------------------------------ baselines
def colour_histogram(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """``bins³`` RGB histograms of uint8 ``(N, H, W, 3)`` images, square-rooted (cosine on them
    is the Hellinger / Bhattacharyya similarity)."""
    q = (images.astype(np.int64) * bins) // 256
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    flat = codes.reshape(len(images), -1)
    hist = np.zeros((len(images), bins**3), np.float32)
    np.add.at(hist, (np.repeat(np.arange(len(images)), flat.shape[1]), flat.ravel()), 1.0)
    return np.sqrt(hist / flat.shape[1])


def _stream(paths: Sequence, spec, *, workers: int, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    from ..data.catalogs import stream_images, unreadable_report

    images, errors = stream_images(paths, spec, workers=workers, batch_size=batch_size, progress=progress)
    if errors:  # a blank image in place of a photo would skew every score without a word
        raise DatasetFormatError(
            "images of the collection can no longer be read (moved or deleted since the build?):\n"
            + unreadable_report(errors, len(paths))
            + "\nrestore them or rebuild the shop"
        )
    return images


def baseline_embeddings(
    name: str,
    paths: Sequence[str | os.PathLike],
    *,
    workers: int = 2,
    image_size: int = 112,
    backbone: str = "mobilenet_v2",
    greyscale_model: str | os.PathLike | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Embeddings of the images at ``paths`` by a baseline (see :data:`BASELINES`):
    ``colour_histogram`` (8×8×8 bins of the 64 px image), ``raw_pixels`` (32×32 RGB),
    ``frozen_imagenet`` (``backbone``'s pooled shipped-ImageNet features at ``image_size``, no
    head), ``greyscale_fashion_mnist`` (the model at ``greyscale_model``, its own input format)."""
    from ..data.transforms import IMAGENET_SPEC

    if name == "colour_histogram":
        return colour_histogram(_stream(paths, replace(IMAGENET_SPEC, size=64), workers=workers))
    if name == "raw_pixels":
        images = _stream(paths, replace(IMAGENET_SPEC, size=32), workers=workers)
        flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
        return flat - flat.mean(1, keepdims=True)
    if name == "frozen_imagenet":
        import torch

        from ..model.inference import extract_features
        from ..model.input_format import default_input_spec
        from ..model.networks import build_backbone

        spec = replace(default_input_spec(backbone, "shipped"), size=image_size)
        net, _ = build_backbone(backbone, in_channels=3, weights="shipped")
        net = net.eval().to(memory_format=torch.channels_last)
        return extract_features(net, _stream(paths, spec, workers=workers), spec, batch_size=128, progress=progress)
    if name == "greyscale_fashion_mnist":
        from ..model.inference import embed_arrays
        from ..model.persistence import load_model

        model = load_model(greyscale_model)
        return embed_arrays(model, _stream(paths, model.input_spec, workers=workers), batch_size=512)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def _thin_to_density(
    unseen: np.ndarray, test: np.ndarray, records: Sequence[Mapping], columns: Sequence[str], seed: int
) -> np.ndarray:
    """``unseen`` keeping at most the median per-style count of ``test`` items of each style."""
    test_counts = np.bincount(style_labels([records[i] for i in test], columns))
    cap = max(2, int(np.median(test_counts[test_counts > 0])))
    styles = style_labels([records[i] for i in unseen], columns)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(unseen[styles == s])[:cap] for s in np.unique(styles)]
    return np.sort(np.concatenate(kept))


def evaluate_shop(
    embeddings: np.ndarray,
    records: Sequence[Mapping],
    paths: Sequence[str | os.PathLike],
    split: Mapping[str, np.ndarray],
    label_columns: Sequence[str],
    *,
    baselines: Sequence[str] = BASELINES,
    greyscale_model: str | os.PathLike | None = None,
    baseline_image_size: int = 112,
    ks: Sequence[int] = (1, 5, 10),
    workers: int = 2,
    progress: bool = False,
    match_density: bool = True,
    seed: int = 0,
) -> dict:
    """The trained model's ``embeddings`` (one per record, catalog order) and each baseline,
    measured the same way on the items never trained on:

    * ``test``: leave-one-out among the ``test`` items (styles seen in training);
    * ``open_set``: the ``unseen`` items (style combinations never trained on) as queries,
      searched among test + unseen items;
    * for the trained model also ``catalog`` and ``catalog_open_set``: the same queries searched
      among *every* catalog item, as the shop's search does (a denser gallery: higher scores).

    With ``match_density`` the unseen items are thinned, per style, to the median number of test
    items per style, so that ``test`` and ``open_set`` search galleries equally dense (scores rise
    with the number of relevant items per query; an open set kept whole would look better than it is).

    Returns ``{"label_columns", "sizes", "methods": {name: {"test": {...}, "open_set": {...},
    "seconds": ...}}, "notes": [...]}``; a baseline that cannot run (no greyscale model) is
    skipped with a note."""
    from ..paths import default_model_path

    test, unseen = np.asarray(split["test"], np.int64), np.asarray(split.get("unseen", []), np.int64)
    if match_density and len(test) and len(unseen):
        unseen = _thin_to_density(unseen, test, records, label_columns, seed)
    pool = np.concatenate([test, unseen])
    pool_records = [records[i] for i in pool]
    open_queries = np.arange(len(test), len(pool))

    def measure(vectors: np.ndarray) -> dict:
        result = {"test": shop_metrics(vectors[: len(test)], pool_records[: len(test)], label_columns, ks=ks)}
        if len(unseen):
            result["open_set"] = shop_metrics(vectors, pool_records, label_columns, ks=ks, queries=open_queries)
        return result

    report = {
        "label_columns": list(label_columns),
        "sizes": {**{k: int(len(v)) for k, v in split.items()}, "open_set_queries": int(len(unseen))},
        "methods": {},
        "notes": [],
    }
    embeddings = np.asarray(embeddings)
    trained = measure(embeddings[pool])
    # the search a shop really runs: a new photo among every catalog item (trained ones included)
    trained["catalog"] = shop_metrics(embeddings, records, label_columns, ks=ks, queries=test)
    if len(unseen):
        trained["catalog_open_set"] = shop_metrics(embeddings, records, label_columns, ks=ks, queries=unseen)
    report["methods"]["trained"] = trained
    pool_paths = [paths[i] for i in pool]
    for name in baselines:
        if name == "greyscale_fashion_mnist":
            model_path = Path(greyscale_model) if greyscale_model else default_model_path()
            if not model_path.is_file():
                report["notes"].append(
                    f"greyscale_fashion_mnist skipped: no model at {model_path} "
                    "(train it with notebook 02 or `python -m fashsim train`)"
                )
                continue
            greyscale_model = model_path
        start = time.perf_counter()
        vectors = baseline_embeddings(
            name,
            pool_paths,
            workers=workers,
            image_size=baseline_image_size,
            greyscale_model=greyscale_model,
            progress=progress,
        )
        report["methods"][name] = {**measure(vectors), "seconds": round(time.perf_counter() - start, 2)}
    return report


def _round(value):
    return None if value is None else round(value, 4)


def comparison_rows(
    report: Mapping,
    *,
    keys: Sequence[str] = (
        "style_recall@1",
        "style_map@r",
        "category_recall@1",
        "baseColour_match@5",
        "pattern_match@5",
    ),
) -> list[dict]:
    """One table row per method of an :func:`evaluate_shop` report: the ``test`` metrics in ``keys``
    (those present) and the open set's style R@1."""
    rows = []
    for name, result in report["methods"].items():
        row = {"method": name}
        row.update({k: _round(result["test"][k]) for k in keys if k in result["test"]})
        if "open_set" in result:
            row["open-set style_recall@1"] = _round(result["open_set"]["style_recall@1"])
        rows.append(row)
    return rows
