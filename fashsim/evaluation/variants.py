"""Variant studies: trained models and query-side re-rankers, compared on equal terms.

The models come from :func:`fashsim.train.variants.train_variants` (same data, backbone family and
wall-clock budget); every ranking is scored with the same leave-one-out metrics and timed per query
(:func:`compare_rankings`, :func:`variant_rows`). Notebook 07 narrates the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..model.inference import embed_arrays
from ..search.reranking import KReciprocalReranker, fractional_rerank
from .metrics import exact_index, retrieval_metrics

METRICS = ("recall@1", "recall@5", "map@r")


def _metrics(embeddings: np.ndarray, labels: np.ndarray, rerank=None, depth: int = 100) -> dict:
    metrics = retrieval_metrics(embeddings, labels, rerank=rerank, rerank_depth=depth)
    return {k: metrics[k] for k in METRICS}


def query_milliseconds(
    model,
    images: np.ndarray,
    gallery: np.ndarray,
    *,
    n_queries: int = 200,
    depth: int = 100,
    rerank: Callable | None = None,
) -> float:
    """Mean milliseconds for one query from pixels to ranked list: embed one image, exact FAISS
    search of the top ``depth`` on an index built once beforehand, then
    ``rerank(query_embedding, candidates)`` if given."""
    n = min(n_queries, len(images))
    index = exact_index(gallery)
    start = time.perf_counter()
    for image in images[:n]:
        query = embed_arrays(model, image[None])
        _, candidates = index.search(query, depth)
        if rerank is not None:
            rerank(query, candidates)
    return 1000.0 * (time.perf_counter() - start) / n


def compare_rankings(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    depth: int = 100,
    fractional_p: tuple[float, ...] = (0.5,),
    k_reciprocal: bool = True,
    n_timed_queries: int = 200,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> list[dict]:
    """Leave-one-out R@1, R@5, MAP@R of ``model`` on ``images`` with plain cosine ranking and
    with each re-ranker on the top ``depth`` candidates, plus the cost: ms per query (pixels to
    ranked list) and, for k-reciprocal, the one-off gallery preparation."""
    embeddings = embed_arrays(model, images)
    rows = []
    rows.append(
        {
            "ranking": "cosine (FAISS, exact)",
            **_metrics(embeddings, labels),
            "ms/query": query_milliseconds(model, images, embeddings, n_queries=n_timed_queries, depth=depth),
        }
    )
    for p in fractional_p:
        metrics = _metrics(
            embeddings, labels, lambda ids, c, p=p: fractional_rerank(embeddings[ids], embeddings, c, p=p), depth
        )
        cost = query_milliseconds(
            model,
            images,
            embeddings,
            n_queries=n_timed_queries,
            depth=depth,
            rerank=lambda q, c, p=p: fractional_rerank(q, embeddings, c, p=p),
        )
        rows.append({"ranking": f"fractional Minkowski p={p} (top {depth})", **metrics, "ms/query": cost})
    if k_reciprocal:
        start = time.perf_counter()
        reranker = KReciprocalReranker(embeddings, k1=k1, k2=k2, lambda_value=lambda_value)
        prepare = time.perf_counter() - start
        metrics = _metrics(embeddings, labels, lambda ids, c: reranker.rerank(embeddings[ids], c, query_ids=ids), depth)
        cost = query_milliseconds(
            model, images, embeddings, n_queries=n_timed_queries, depth=depth, rerank=lambda q, c: reranker.rerank(q, c)
        )
        name = f"k-reciprocal k1={k1} k2={k2} λ={lambda_value} (top {depth}; gallery prep {prepare:.1f} s)"
        rows.append({"ranking": name, **metrics, "ms/query": cost})
    return rows


def variant_rows(
    trained: dict[str, dict], images: np.ndarray, labels: np.ndarray, *, n_timed_queries: int = 200
) -> list[dict]:
    """One table row per trained variant: leave-one-out metrics on ``images``, training time,
    epochs and ms per query (embed + exact search)."""
    rows = []
    for name, info in trained.items():
        embeddings = embed_arrays(info["model"], images)
        rows.append(
            {
                "variant": name,
                **_metrics(embeddings, labels),
                "train s": info["train_seconds"],
                "epochs": info["epochs"],
                "ms/query": query_milliseconds(info["model"], images, embeddings, n_queries=n_timed_queries),
            }
        )
    return rows


def verdict(rows: list[dict], key: str, baseline: str, *, metric: str = "map@r", tolerance: float = 0.005) -> list[str]:
    """Plain-words lines: which rows beat, match or trail the ``baseline`` row on ``metric``
    (differences within ``tolerance`` count as a tie: one run, one seed)."""
    reference = next(r for r in rows if r[key] == baseline)[metric]
    lines = []
    for row in rows:
        if row[key] == baseline:
            continue
        delta = row[metric] - reference
        word = "helped" if delta > tolerance else "hurt" if delta < -tolerance else "made no real difference"
        lines.append(f"{row[key]}: {word} ({metric} {row[metric]:.4f} vs {reference:.4f}, {delta:+.4f})")
    return lines
