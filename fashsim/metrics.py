"""Retrieval metrics, computed exactly and memory-safely (FAISS k-NN, queries in chunks).

Definitions (``R`` = number of gallery items relevant to the query, i.e. of its category,
the query itself excluded in leave-one-out mode):

* **Recall@K** — share of queries with at least one relevant item among the top K (the
  definition used by the metric-learning literature and the project's seeds).
* **Precision@K** — mean share of relevant items among the top K.
* **R-precision** — mean share of relevant items among the top R.
* **MAP@R** (Musgrave, Belongie & Lim 2020) — mean over queries of
  ``(1/R) · Σ_{i≤R} P(i)·rel(i)``: average precision truncated at R, rewarding clusters that are
  both pure and tight.

Modes: leave-one-out within one set (``query_embeddings=None``: every item is a query against
all the others) or a query set against a gallery set. Similarity is cosine (embeddings are
L2-normalised here).
"""

from __future__ import annotations

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _flat_index(gallery: np.ndarray):
    import faiss

    g = _normalise(gallery)
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return index


def _search(index, queries: np.ndarray, k: int, self_ids: np.ndarray | None = None):
    """Search ``index``; with ``self_ids`` (each query's own gallery index) drop the query itself."""
    if self_ids is None:
        return index.search(_normalise(queries), min(k, index.ntotal))
    sims, idx = index.search(_normalise(queries), min(k + 1, index.ntotal))
    own = idx == self_ids[:, None]
    own[~own.any(1), -1] = True  # where ties pushed the query out of its list, drop the last column
    keep = ~own
    n = len(queries)
    return sims[keep].reshape(n, -1)[:, :k], idx[keep].reshape(n, -1)[:, :k]


def knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours of each query (exact, FAISS): ``(similarities, indices)``.

    ``exclude_self`` (queries *are* the gallery, same order) drops each query's own index.
    """
    return _search(_flat_index(gallery), queries, k, np.arange(len(queries)) if exclude_self else None)


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    query_embeddings: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K, Precision@K, R-precision and MAP@R (see the module docstring), as fractions.

    Without ``query_embeddings`` every item queries all the others (leave-one-out).
    """
    labels = np.asarray(labels)
    leave_one_out = query_embeddings is None
    if leave_one_out:
        query_embeddings, query_labels = embeddings, labels
    query_labels = np.asarray(query_labels)
    gallery_counts = dict(zip(*np.unique(labels, return_counts=True)))
    relevant = np.array([gallery_counts.get(label, 0) for label in query_labels]) - (1 if leave_one_out else 0)
    has_relevant = relevant > 0
    if not has_relevant.any():
        raise ValueError("no query has a relevant gallery item: nothing to measure")
    depth = int(max(max(ks), relevant.max()))
    totals = {f"recall@{k}": 0.0 for k in ks} | {f"precision@{k}": 0.0 for k in ks} | {"r_precision": 0.0, "map@r": 0.0}
    index = _flat_index(embeddings)
    for start in range(0, len(query_labels), chunk_size):
        chunk = slice(start, min(start + chunk_size, len(query_labels)))
        self_ids = np.arange(chunk.start, chunk.stop) if leave_one_out else None
        _, idx = _search(index, query_embeddings[chunk], depth, self_ids)
        hits = labels[idx] == query_labels[chunk, None]
        mask = has_relevant[chunk]
        hits, r = hits[mask], relevant[chunk][mask]
        for k in ks:
            totals[f"recall@{k}"] += hits[:, :k].any(1).sum()
            totals[f"precision@{k}"] += hits[:, :k].mean(1).sum()
        ranks = np.arange(1, depth + 1)
        within_r = ranks[None, :] <= r[:, None]
        hits_r = hits & within_r
        totals["r_precision"] += (hits_r.sum(1) / r).sum()
        precision_at_i = np.cumsum(hits_r, axis=1) / ranks[None, :]
        totals["map@r"] += ((precision_at_i * hits_r).sum(1) / r).sum()
    n = int(has_relevant.sum())
    return {name: float(value / n) for name, value in totals.items()}

