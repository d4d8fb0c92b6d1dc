"""Index kinds measured against exact search: recall@k, queries per second, build time, memory."""

from __future__ import annotations

import time

import numpy as np

from ..search.index import VectorIndex


def best_qps(search, queries: np.ndarray, repeats: int = 1) -> tuple[float, object]:
    """Queries per second of ``search(queries)`` (one batch), the fastest of ``repeats`` runs (on a
    shared machine the fastest run is the least disturbed one), and the last run's result."""
    best, result = np.inf, None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = search(queries)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, result


def compare_kinds(
    base: np.ndarray,
    queries: np.ndarray,
    configs,
    *,
    k: int = 10,
    ids=None,
    train_sample: int = 100_000,
    repeats: int = 1,
    seed: int = 0,
    progress=None,
) -> list[dict]:
    """Build each index kind over ``base`` and measure it against exact search.

    ``configs``: ``[(kind, params, sweep), ...]``: ``kind`` a kind name or FAISS factory string,
    ``params`` its :class:`~fashsim.search.index.VectorIndex` parameters, ``sweep`` a list of
    search-effort settings (``{"ef_search": 64}``, ``{"nprobe": 8, "k_factor": 16}``; ``[{}]`` for
    none). IVF kinds train on ``train_sample`` random vectors of ``base``. Returns one row per
    setting: kind, factory, params, recall@k (``faiss.contrib.evaluation.knn_intersection_measure``
    against exact search: the share of the true top-k found), qps (all queries in one batch, the
    fastest of ``repeats`` runs), exact_qps, speedup (qps / exact_qps), build_seconds (training
    included), memory_mb (serialised size) and memory_vs_flat. ``progress``: called with each row.
    """
    from faiss.contrib.evaluation import knn_intersection_measure

    ids = np.arange(len(base)) if ids is None else np.asarray(ids)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exact = VectorIndex(base.shape[1], "flat", use_gpu=False)
    start = time.perf_counter()
    exact.add(base, ids)
    exact_build = time.perf_counter() - start
    exact_qps, (_, truth) = best_qps(lambda q: exact.search(q, k), queries, repeats)
    flat_bytes = len(exact.to_bytes())
    rows = [_row("flat", exact.factory, {}, k, 1.0, exact_qps, exact_qps, exact_build, flat_bytes, flat_bytes)]
    if progress:
        progress(rows[-1])
    exact = None  # free the float vectors before building the other kinds
    for kind, params, sweep in configs:
        index = VectorIndex(base.shape[1], kind, use_gpu=False, **params)
        start = time.perf_counter()
        if index.needs_training:
            rng = np.random.default_rng(seed)
            index.train(base[rng.choice(len(base), min(len(base), train_sample), replace=False)], n_items=len(base))
        index.add(base, ids)
        build = time.perf_counter() - start
        size = len(index.to_bytes())
        for effort in sweep:
            index.set_search_effort(**effort)
            qps, (_, found) = best_qps(lambda q, index=index: index.search(q, k), queries, repeats)
            recall = knn_intersection_measure(found, truth)
            rows.append(_row(kind, index.factory, {**params, **effort}, k, recall, qps, exact_qps, build, size,
                             flat_bytes))  # fmt: skip
            if progress:
                progress(rows[-1])
        del index
    return rows


def _row(kind, factory, params, k, recall, qps, exact_qps, build, size, flat_bytes) -> dict:
    return {
        "kind": kind,
        "factory": factory,
        "params": params,
        f"recall@{k}": round(float(recall), 4),
        "qps": round(qps, 1),
        "exact_qps": round(exact_qps, 1),
        "speedup": round(qps / exact_qps, 1),
        "build_seconds": round(build, 3),
        "memory_mb": round(size / 2**20, 2),
        "memory_vs_flat": round(size / flat_bytes, 3),
    }
