"""Re-ranking the top candidates of a FAISS search: fractional distance and k-reciprocal.

FAISS returns the top candidates by cosine similarity; a re-ranker reorders the first ``depth``
of them (the rest keep their order):

* :func:`fractional_rerank` — Minkowski distance with ``p < 1``, ``(Σ|q − g|^p)^(1/p)``, from
  "Retrieving Similar E-Commerce Images Using Deep Learning" (arXiv 1901.03546), which argues
  that fractional norms keep nearest neighbours meaningful in high dimensions (Aggarwal et al.
  2001).
* :class:`KReciprocalReranker` — k-reciprocal encoding (Zhong et al. 2017, "Re-ranking Person
  Re-identification with k-reciprocal Encoding"): two items are close when each is among the
  other's k nearest neighbours; neighbourhoods are compared as weighted sets (Jaccard distance)
  and blended with the original distance. The gallery's neighbourhoods are computed once, so a
  query costs one extra neighbourhood and ``depth`` sparse comparisons.
"""

from __future__ import annotations

import numpy as np

from ..evaluation.metrics import knn


def minkowski_distances(queries: np.ndarray, candidates: np.ndarray, p: float) -> np.ndarray:
    """``(Q, L)`` Minkowski distances of order ``p`` between each query ``(Q, D)`` and its
    candidates ``(Q, L, D)``."""
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    diff = np.abs(candidates.astype(np.float32) - queries[:, None, :].astype(np.float32))
    return np.power(np.power(diff, p).sum(-1), 1.0 / p)


def fractional_rerank(
    queries: np.ndarray, gallery: np.ndarray, candidates: np.ndarray, *, p: float = 0.5, chunk_size: int = 256
) -> np.ndarray:
    """``candidates`` (gallery ids ``(Q, L)``, best first) reordered by Minkowski distance of
    order ``p`` between the query and each candidate (stable, so ties keep the FAISS order)."""
    out = np.empty_like(candidates)
    for start in range(0, len(candidates), chunk_size):
        rows = slice(start, start + chunk_size)
        distances = minkowski_distances(queries[rows], gallery[candidates[rows]], p)
        out[rows] = np.take_along_axis(candidates[rows], np.argsort(distances, axis=1, kind="stable"), axis=1)
    return out


class KReciprocalReranker:
    """k-reciprocal re-ranking against a fixed gallery of unit embeddings.

    ``k1`` is the neighbourhood size, ``k2`` the local query expansion, ``lambda_value`` the
    weight of the original distance in the final blend (Zhong et al.'s defaults: 20, 6, 0.3).
    Distances are ``1 − cosine``. Building it computes every gallery item's k-reciprocal
    neighbourhood once (one FAISS k-NN search of the gallery against itself).
    """

    def __init__(self, gallery: np.ndarray, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> None:
        from scipy import sparse

        if not 1 <= k2 <= k1:
            raise ValueError(f"need 1 <= k2 <= k1, got k1={k1}, k2={k2}")
        self.gallery = np.ascontiguousarray(gallery, dtype=np.float32)
        self.k1, self.k2, self.lambda_value = k1, k2, lambda_value
        n = len(self.gallery)
        if n <= k1:
            raise ValueError(f"the gallery needs more than k1={k1} items, it has {n}")
        sims, ids = knn(self.gallery, self.gallery, k1, exclude_self=True)
        ids = np.concatenate([np.arange(n)[:, None], ids], axis=1)  # each item first: its own neighbour
        self.neighbours = ids
        self.distances = np.concatenate([np.zeros((n, 1), np.float32), 1.0 - sims], axis=1)
        # an outsider x belongs to g's (k1+1)-neighbourhood when it is nearer than g's last neighbour
        self.radius = self.distances[:, k1]
        self.half_sets = self._reciprocal_sets(ids, int(round(k1 / 2)))
        members = [self._expand(m) for m in self._reciprocal_sets(ids, k1)]
        v = self._rows(self.gallery, members)
        # local query expansion: the mean of the rows of each item's k2 nearest neighbours (itself included)
        expand = sparse.csr_matrix(
            (np.full(n * k2, 1.0 / k2), ids[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)), shape=(n, n)
        )
        self.v_raw, self.v = v, (expand @ v).tocsr()

    def _reciprocal_sets(self, ids: np.ndarray, k: int) -> list[np.ndarray]:
        """For rows of (self-first) neighbour lists: the members whose own k-list contains the row's owner."""
        forward = ids[:, : k + 1]
        backward = self.neighbours[forward, : k + 1]  # (rows, k+1, k+1)
        mutual = (backward == forward[:, :1, None]).any(-1)
        return [f[m] for f, m in zip(forward, mutual)]

    def _expand(self, members: np.ndarray) -> np.ndarray:
        """Zhong et al.'s expansion: add a member's half-size reciprocal set when it overlaps by > 2/3."""
        expanded = [members]
        member_set = set(members.tolist())
        for c in members:
            half = self.half_sets[c]
            if len(half) and sum(h in member_set for h in half.tolist()) > 2 / 3 * len(half):
                expanded.append(half)
        return np.unique(np.concatenate(expanded))

    def _rows(self, owners: np.ndarray, members: list[np.ndarray]):
        """Sparse rows, one per owner vector: exp(−distance) to each of its members, summing to 1."""
        from scipy import sparse

        weights = []
        for vector, ids in zip(owners, members):
            w = np.exp(-(1.0 - self.gallery[ids] @ vector)).astype(np.float64)
            weights.append(w / w.sum())
        indptr = np.concatenate([[0], np.cumsum([len(m) for m in members])])
        return sparse.csr_matrix(
            (np.concatenate(weights), np.concatenate(members), indptr), shape=(len(members), len(self.gallery))
        )

    def _query_row(self, query: np.ndarray, candidates: np.ndarray, candidate_distances: np.ndarray):
        """The expanded neighbourhood row of a query from outside the gallery."""
        from scipy import sparse

        k1 = min(self.k1, len(candidates))
        near = candidates[:k1]
        members = near[candidate_distances[:k1] <= self.radius[near]]  # q is in their neighbourhood too
        if len(members) == 0:
            members = near[:1]
        row = self._rows(query[None], [self._expand(members)])
        partners = self.v_raw[candidates[: self.k2 - 1]]
        return sparse.vstack([row, partners]).mean(axis=0).A1

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, *, query_ids: np.ndarray | None = None) -> np.ndarray:
        """``candidates`` (gallery ids ``(Q, L)``, best first by cosine) reordered by the blended
        k-reciprocal distance. ``query_ids``: the queries' own gallery ids when they are gallery
        items (leave-one-out evaluation), so their precomputed neighbourhoods are used."""
        queries = np.asarray(queries, dtype=np.float32)
        out = np.empty_like(candidates)
        for i, cands in enumerate(candidates):
            original = 1.0 - self.gallery[cands] @ queries[i]
            if query_ids is not None:
                row = self.v[query_ids[i]]
                cols, q_values = row.indices, row.data
            else:
                dense = self._query_row(queries[i], cands, original)
                cols = np.flatnonzero(dense)
                q_values = dense[cols]
            shared = self.v[cands][:, cols].toarray()  # the candidates' weights on the query's support
            overlap = np.minimum(shared, q_values[None, :]).sum(1)
            jaccard = 1.0 - overlap / (2.0 - overlap)  # every row sums to 1: Σmax = 2 − Σmin
            final = (1.0 - self.lambda_value) * jaccard + self.lambda_value * original
            out[i] = cands[np.argsort(final, kind="stable")]
        return out
