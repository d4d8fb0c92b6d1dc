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


def exact_index(gallery: np.ndarray):
    """An exact inner-product FAISS index over the L2-normalised ``gallery`` (cosine similarity)."""
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
    return _search(exact_index(gallery), queries, k, np.arange(len(queries)) if exclude_self else None)


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    query_embeddings: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
    rerank=None,
    rerank_depth: int = 100,
) -> dict[str, float]:
    """Recall@K, Precision@K, R-precision and MAP@R (see the module docstring), as fractions.

    Without ``query_embeddings`` every item queries all the others (leave-one-out).
    ``rerank(query_rows, candidates)``, if given, reorders the first ``rerank_depth`` gallery ids
    of each ranking (``query_rows``: the queries' positions; see :mod:`fashsim.search.reranking`).
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
    index = exact_index(embeddings)
    for start in range(0, len(query_labels), chunk_size):
        chunk = slice(start, min(start + chunk_size, len(query_labels)))
        self_ids = np.arange(chunk.start, chunk.stop) if leave_one_out else None
        _, idx = _search(index, query_embeddings[chunk], depth, self_ids)
        if rerank is not None:
            top = min(rerank_depth, idx.shape[1])
            idx[:, :top] = rerank(np.arange(chunk.start, chunk.stop), idx[:, :top])
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


def mean_average_precision(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    query_embeddings: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    chunk_size: int = 256,
) -> float:
    """mAP over the *full* ranking of the gallery (every relevant item counts, however deep),
    leave-one-out or query-vs-gallery like :func:`retrieval_metrics`. Chunked matrix products:
    memory grows with ``chunk_size × gallery size``, never with gallery size squared."""
    labels = np.asarray(labels)
    gallery = _normalise(embeddings)
    leave_one_out = query_embeddings is None
    queries = gallery if leave_one_out else _normalise(query_embeddings)
    query_labels = labels if leave_one_out else np.asarray(query_labels)
    total, counted = 0.0, 0
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        sims = queries[start:stop] @ gallery.T
        if leave_one_out:
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # the query itself
        order = np.argsort(-sims, axis=1, kind="stable")
        relevant = labels[order] == query_labels[start:stop, None]
        if leave_one_out:
            relevant[:, -1] = False  # the query itself sorts last
        n_relevant = relevant.sum(1)
        precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
        ap = (precision * relevant).sum(1) / np.maximum(n_relevant, 1)
        total += ap[n_relevant > 0].sum()
        counted += int((n_relevant > 0).sum())
    return float(total / counted) if counted else 0.0


def triplet_accuracy(embeddings: np.ndarray, labels: np.ndarray, *, n_triplets: int = 100_000, seed: int = 0) -> float:
    """Share of random triplets (anchor, positive of its class, negative of another class) with
    ``cos(a, p) > cos(a, n)`` — the "triplet accuracy" some papers report."""
    x = _normalise(embeddings)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = np.concatenate([idx for idx in by_class.values() if len(idx) >= 2])
    if len(by_class) < 2 or len(eligible) == 0:
        raise ValueError("triplets need at least two classes and a class with two items")
    anchors = rng.choice(eligible, n_triplets)
    positives = np.empty(n_triplets, np.int64)
    negatives = np.empty(n_triplets, np.int64)
    for c, idx in by_class.items():
        mask = labels[anchors] == c
        m = int(mask.sum())
        if not m:
            continue
        # a positive different from the anchor: shift by a random non-zero offset within the class
        position = np.searchsorted(idx, anchors[mask])
        positives[mask] = idx[(position + rng.integers(1, len(idx), m)) % len(idx)]
        others = np.flatnonzero(labels != c)
        negatives[mask] = rng.choice(others, m)
    ap = np.einsum("ij,ij->i", x[anchors], x[positives])
    an = np.einsum("ij,ij->i", x[anchors], x[negatives])
    return float(np.mean(ap > an))


def knn_predict(
    embeddings: np.ndarray, labels: np.ndarray, *, k: int = 10, query_embeddings: np.ndarray | None = None
) -> np.ndarray:
    """Predicted class of each query by a similarity-weighted vote of its ``k`` nearest gallery
    items (leave-one-out when ``query_embeddings`` is None)."""
    labels = np.asarray(labels)
    leave_one_out = query_embeddings is None
    queries = embeddings if leave_one_out else query_embeddings
    sims, idx = knn(queries, embeddings, k, exclude_self=leave_one_out)
    classes = np.unique(labels)
    votes = np.zeros((len(queries), len(classes)))
    position = np.searchsorted(classes, labels[idx])
    np.add.at(votes, (np.arange(len(queries))[:, None].repeat(idx.shape[1], 1), position), np.maximum(sims, 0) + 1e-6)
    return classes[votes.argmax(1)]


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts: rows are true classes, columns predicted ones."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(true, predicted, labels=np.arange(n_classes))


def per_class_recall_at_1(embeddings: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Recall@1 (leave-one-out) for each class separately."""
    labels = np.asarray(labels)
    _, idx = knn(embeddings, embeddings, 1, exclude_self=True)
    hit = labels[idx[:, 0]] == labels
    return {int(c): float(hit[labels == c].mean()) for c in np.unique(labels)}
