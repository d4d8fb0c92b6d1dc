"""Re-ranking: fractional (Minkowski p < 1) distance and k-reciprocal encoding."""

import numpy as np
import pytest

from fashsim.evaluation.metrics import knn, retrieval_metrics
from fashsim.search import reranking


def _unit(n, d=16, seed=0, clusters=5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + 0.8 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_minkowski_by_hand():
    q = np.array([[0.0, 0.0]], np.float32)
    c = np.array([[[1.0, 1.0], [4.0, 0.0]]], np.float32)
    d = reranking.minkowski_distances(q, c, 0.5)
    assert d[0] == pytest.approx([(1 + 1) ** 2, 4.0])  # (√1 + √1)² = 4 ties with 4: p < 1 punishes spread
    assert reranking.minkowski_distances(q, c, 1.0)[0] == pytest.approx([2.0, 4.0])
    with pytest.raises(ValueError):
        reranking.minkowski_distances(q, c, 0.0)


def test_fractional_rerank_orders_by_minkowski_and_p2_keeps_the_cosine_order():
    x, _ = _unit(300)
    _, candidates = knn(x, x, 30, exclude_self=True)
    same = reranking.fractional_rerank(x, x, candidates, p=2.0)  # unit vectors: L2 order == cosine order
    assert (same == candidates).mean() > 0.99
    reordered = reranking.fractional_rerank(x, x, candidates, p=0.5)
    assert sorted(reordered[0]) == sorted(candidates[0]) and (reordered != candidates).any()
    d = reranking.minkowski_distances(x[:1], x[reordered[:1]], 0.5)[0]
    assert np.all(np.diff(d) >= 0)


def _zhong_reference(x, k1, k2, lam):
    """Zhong et al.'s published full-matrix algorithm (re_ranking), with 1 − cosine distances."""
    n = len(x)
    dist = 1.0 - x @ x.T
    rank = np.argsort(dist, axis=1)
    v = np.zeros((n, n))
    for i in range(n):
        forward = rank[i, : k1 + 1]
        recip = forward[np.where(rank[forward, : k1 + 1] == i)[0]]
        expansion = recip
        for c in recip:
            cf = rank[c, : int(round(k1 / 2)) + 1]
            crecip = cf[np.where(rank[cf, : int(round(k1 / 2)) + 1] == c)[0]]
            if len(np.intersect1d(crecip, recip)) > 2 / 3 * len(crecip):
                expansion = np.append(expansion, crecip)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    overlap = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    jaccard = 1 - overlap / (2 - overlap)
    return (1 - lam) * jaccard + lam * dist


def test_k_reciprocal_matches_the_published_algorithm():
    x, _ = _unit(200, seed=1)
    final = _zhong_reference(x.astype(np.float64), k1=10, k2=4, lam=0.3)
    reranker = reranking.KReciprocalReranker(x, k1=10, k2=4, lambda_value=0.3)
    _, candidates = knn(x, x, 40, exclude_self=True)
    ours = reranker.rerank(x, candidates, query_ids=np.arange(len(x)))
    expected = np.stack([c[np.argsort(final[i, c], kind="stable")] for i, c in enumerate(candidates)])
    assert (ours[:, :10] == expected[:, :10]).mean() > 0.98  # float32 vs float64 may swap near-ties


def test_k_reciprocal_new_queries_and_metrics_hook():
    x, labels = _unit(600, seed=2)
    reranker = reranking.KReciprocalReranker(x[:500])
    _, candidates = knn(x[500:], x[:500], 50)
    reordered = reranker.rerank(x[500:], candidates)  # queries from outside the gallery
    assert reordered.shape == candidates.shape
    assert all(sorted(a) == sorted(b) for a, b in zip(reordered, candidates))
    base = retrieval_metrics(x, labels)
    loo = reranking.KReciprocalReranker(x)
    hooked = retrieval_metrics(
        x, labels, rerank=lambda rows, c: loo.rerank(x[rows], c, query_ids=rows), rerank_depth=50
    )
    assert hooked["map@r"] != base["map@r"] and 0 < hooked["recall@1"] <= 1
    with pytest.raises(ValueError, match="k2"):
        reranking.KReciprocalReranker(x, k1=5, k2=6)
