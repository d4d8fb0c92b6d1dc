"""Index kinds measured against exact search: recall@k, queries per second, build time, memory."""

from __future__ import annotations

import time

import numpy as np

from ..search.index import VectorIndex


def compare_kinds(base: np.ndarray, queries: np.ndarray, configs, *, k: int = 10, ids=None) -> list[dict]:
    """Build each index kind over ``base`` and measure it against exact search.

    ``configs``: ``[(kind, params, sweep), ...]`` where ``sweep`` is a list of
    ``{"ef_search": 64}``-style search-effort settings (``[{}]`` for none). Returns one row per
    setting: kind, params, recall@k (vs exact), qps (all queries in one batch), exact_qps,
    build_seconds, memory_mb (serialised size).
    """
    ids = np.arange(len(base)) if ids is None else np.asarray(ids)
    exact = VectorIndex(base.shape[1], "flat")
    start = time.perf_counter()
    exact.add(base, ids)
    exact_build = time.perf_counter() - start
    start = time.perf_counter()
    _, truth = exact.search(queries, k)
    exact_qps = len(queries) / (time.perf_counter() - start)
    rows = [{"kind": "flat", "params": {}, f"recall@{k}": 1.0, "qps": round(exact_qps, 1),
             "exact_qps": round(exact_qps, 1), "build_seconds": round(exact_build, 3),
             "memory_mb": round(len(exact.to_bytes()) / 2**20, 2)}]
    del exact
    for kind, params, sweep in configs:
        index = VectorIndex(base.shape[1], kind, **params)
        start = time.perf_counter()
        if index.needs_training:
            sample = base[np.random.default_rng(0).choice(len(base), min(len(base), 100_000), replace=False)]
            index.train(sample)
        index.add(base, ids)
        build = time.perf_counter() - start
        memory = round(len(index.to_bytes()) / 2**20, 2)
        for effort in sweep:
            index.set_search_effort(**effort)
            start = time.perf_counter()
            _, found = index.search(queries, k)
            qps = len(queries) / (time.perf_counter() - start)
            recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
            rows.append({"kind": kind, "params": {**params, **effort}, f"recall@{k}": round(recall, 4),
                         "qps": round(qps, 1), "exact_qps": round(exact_qps, 1),
                         "build_seconds": round(build, 3), "memory_mb": memory})
        del index
    return rows
