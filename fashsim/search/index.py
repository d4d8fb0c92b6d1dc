"""FAISS vector index over L2-normalised embeddings: inner product = cosine similarity.

:class:`VectorIndex` wraps one FAISS index behind stable int64 item ids:

* ``flat`` — exact search (``IndexFlatIP``);
* ``hnsw`` — graph-based approximate search (``IndexHNSWFlat``): fast, memory ≈ vectors + graph;
* ``ivfpq`` — inverted lists + product quantisation (``IndexIVFPQ``, trained on a sample):
  compact (``pq_m`` bytes a vector) for collections that do not fit in memory as floats;
* ``auto`` — by collection size: ``flat`` below :data:`AUTO_HNSW_FROM` items (exact search over
  100 k × 128 floats takes a few ms), ``hnsw`` below :data:`AUTO_IVFPQ_FROM`, ``ivfpq`` above.

``add`` refuses ids already present (use ``upsert`` to replace), ``remove`` needs no rebuild
(HNSW graphs cannot delete nodes, so removed ids are masked at search time and physically
dropped at the next ``compact``). Filters are id sets (:meth:`search` ``allowed_ids``) applied
inside FAISS with an ``IDSelector``, with an exact fallback when a filter is too selective for
the graph or the inverted lists to return ``k`` matches. The GPU is used for ``flat`` and
``ivfpq`` when faiss-gpu and a GPU are present (:attr:`device` says where the index lives).
"""

from __future__ import annotations

import numpy as np

from ..errors import FashsimError

KINDS = ("flat", "hnsw", "ivfpq", "auto")
AUTO_HNSW_FROM = 200_000
AUTO_IVFPQ_FROM = 5_000_000


class VectorIndexError(FashsimError):
    """Misuse of an index (duplicate ids, wrong dimension, untrained IVF-PQ, ...)."""


def gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def choose_kind(n_items: int) -> str:
    """The ``auto`` rule: flat → hnsw → ivfpq as the collection grows."""
    if n_items < AUTO_HNSW_FROM:
        return "flat"
    return "hnsw" if n_items < AUTO_IVFPQ_FROM else "ivfpq"


def _search_with_params(index, x: np.ndarray, k: int, params):
    """``index.search`` with FAISS SearchParameters, also when ``faiss.contrib.torch_utils`` (imported
    by e.g. pytorch-metric-learning) has replaced ``search`` by a version without ``params``."""
    search = getattr(index, "search_numpy", None) or index.search
    return search(x, k, params=params)


def _as_matrix(vectors, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
    if x.ndim != 2 or x.shape[1] != dim:
        raise VectorIndexError(f"expected vectors of dimension {dim}, got shape {np.shape(vectors)}")
    return x


class VectorIndex:
    """A FAISS index with stable ids, removal, filters and optional GPU (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int | None = None,
        pq_m: int = 32,
        nprobe: int = 32,
        use_gpu: bool | str = "auto",
    ) -> None:
        if kind not in KINDS or kind == "auto":
            raise ValueError(f"kind must be one of flat, hnsw, ivfpq (resolve 'auto' with choose_kind), got {kind!r}")
        self.dim, self.kind = int(dim), kind
        self.params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
                       "nlist": nlist, "pq_m": pq_m, "nprobe": nprobe}
        self._index = self._build()
        self._ids = np.empty(0, np.int64)  # live ids, kept in step with the FAISS index
        self._deleted: set[int] = set()  # hnsw tombstones
        self.device = "cpu"
        self._gpu_resources = None
        if use_gpu is True and gpu_count() == 0:
            raise VectorIndexError("use_gpu=True but FAISS sees no GPU (install faiss-gpu and check the driver)")
        if use_gpu and gpu_count() > 0 and kind != "hnsw":
            self._to_gpu()

    # ---------------------------------------------------------------- construction
    def _build(self):
        import faiss

        p = self.params
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.kind == "hnsw":
            base = faiss.IndexHNSWFlat(self.dim, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = p["ef_construction"]
            base.hnsw.efSearch = p["ef_search"]
            return faiss.IndexIDMap2(base)
        if self.dim % p["pq_m"]:
            raise VectorIndexError(f"pq_m={p['pq_m']} must divide the dimension {self.dim}")
        return None  # ivfpq is created by train(), when nlist can follow the sample size

    def _to_gpu(self) -> None:
        import faiss

        self._gpu_resources = faiss.StandardGpuResources()
        if self._index is not None:
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
        self.device = "cuda:0"

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivfpq" and (self._index is None or not self._index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """IVF-PQ only: learn the coarse centroids and PQ codebooks from a sample of vectors."""
        import faiss

        if self.kind != "ivfpq":
            return
        x = _as_matrix(sample, self.dim)
        nlist = self.params["nlist"] or int(max(16, min(65536, 4 * np.sqrt(len(x) * 8))))
        nlist = min(nlist, max(1, len(x) // 39))  # FAISS wants ≥ 39 training points per centroid
        self.params["nlist"] = nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.params["pq_m"], 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small samples train without warnings
        index.pq.cp.min_points_per_centroid = 1
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # arbitrary ids: remove + reconstruct
        index.train(x)
        index.nprobe = self.params["nprobe"]
        self._quantizer = quantizer  # keep it alive alongside the index
        self._index = index
        if self.device != "cpu":
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)

    # ---------------------------------------------------------------- content
    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """All live ids, sorted."""
        return np.sort(self._ids)

    def __contains__(self, item_id: int) -> bool:
        return bool(np.isin(item_id, self._ids))

    def add(self, vectors: np.ndarray, ids) -> None:
        """Add vectors under new ids; ids already present raise (use :meth:`upsert`)."""
        x = _as_matrix(vectors, self.dim)
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        if len(ids) != len(x):
            raise VectorIndexError(f"{len(x)} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise VectorIndexError("the ids to add contain duplicates")
        present = np.intersect1d(ids, self._ids)
        if present.size:
            raise VectorIndexError(f"{present.size} ids are already in the index (e.g. {present[:5].tolist()}): "
                              "remove them first or use upsert()")
        if self.needs_training:
            raise VectorIndexError("an ivfpq index must be trained first: call train(sample)")
        revived = self._deleted & set(ids.tolist())
        if revived:  # an hnsw id removed earlier and added again: drop the old node for good first
            self.compact()
        self._index.add_with_ids(x, ids)
        self._ids = np.concatenate([self._ids, ids])

    def upsert(self, vectors: np.ndarray, ids) -> None:
        """Add, replacing the vectors of ids that are already present."""
        self.remove(ids, missing_ok=True)
        self.add(vectors, ids)

    def remove(self, ids, *, missing_ok: bool = False) -> int:
        """Remove ids without rebuilding; returns how many were removed."""
        import faiss

        ids = np.asarray(ids, dtype=np.int64).ravel()
        present = np.intersect1d(ids, self._ids)
        if not missing_ok and len(present) != len(np.unique(ids)):
            missing = np.setdiff1d(ids, present)
            raise VectorIndexError(f"{missing.size} ids are not in the index (e.g. {missing[:5].tolist()})")
        if present.size == 0:
            return 0
        if self.kind == "hnsw":
            self._deleted |= set(present.tolist())
        else:  # IDSelectorArray: the only selector IVF's id hashtable accepts
            present = np.ascontiguousarray(present)
            self._index.remove_ids(faiss.IDSelectorArray(len(present), faiss.swig_ptr(present)))
        self._ids = self._ids[~np.isin(self._ids, present)]
        return int(present.size)

    def compact(self) -> None:
        """HNSW: rebuild without the removed nodes (other kinds remove physically already)."""
        if self.kind != "hnsw" or not self._deleted:
            return
        live = self._ids
        vectors = self.reconstruct(live)
        self._index, self._deleted = self._build(), set()
        if len(live):
            self._index.add_with_ids(vectors, live)

    def reconstruct(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (approximate for ivfpq)."""
        import faiss

        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        if len(ids) == 0:
            return np.empty((0, self.dim), np.float32)
        index = faiss.index_gpu_to_cpu(self._index) if self.device != "cpu" else self._index
        try:
            return index.reconstruct_batch(ids)
        except RuntimeError:  # kinds without a batch reconstruction
            return np.vstack([index.reconstruct(int(i)) for i in ids])

    def _deleted_ids(self) -> np.ndarray:
        """HNSW ids removed but still in the graph (masked at search time until :meth:`compact`)."""
        return np.fromiter(self._deleted, np.int64, count=len(self._deleted))

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, *, allowed_ids=None,
               filter_strategy: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores, ids)`` of shape ``(n_queries, k)``, best first,
        padded with score ``-inf`` and id ``-1`` when fewer items qualify.

        ``allowed_ids`` restricts results to those ids (category filters and the like): through a
        FAISS IDSelector (``filter_strategy="selector"``, the fastest: see ``bench_search.py``), by
        exact search over just those ids (``"exact"``), or ``"auto"``: the selector, then an exact
        search for the queries it left short of ``k`` (HNSW graphs can miss matches of very
        selective filters).
        """
        import faiss

        q = _as_matrix(queries, self.dim)
        n = len(q)
        if k <= 0:
            raise VectorIndexError(f"k must be positive, got {k}")
        if self._index is None or len(self) == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        if allowed_ids is None and not self._deleted:
            scores, ids = self._index.search(q, k)
            return _pad(scores, ids, k)
        if allowed_ids is not None:
            if filter_strategy not in ("auto", "exact", "selector"):
                raise ValueError(f"filter_strategy must be auto, exact or selector, got {filter_strategy!r}")
            allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if self._deleted:
                allowed = allowed[~np.isin(allowed, self._deleted_ids())]
            if filter_strategy == "exact":
                return self._exact_subset(q, k, np.intersect1d(allowed, self._ids, assume_unique=True))
            selector = faiss.IDSelectorBatch(allowed)  # ids not in the index simply never match
            scores, ids = _pad(*_search_with_params(self._index, q, k, self._search_params(selector)), k)
            short = (ids >= 0).sum(1) < k
            if filter_strategy == "auto" and short.any():
                # graph and IVF search can miss matches of a very selective filter: redo those rows exactly
                present = np.intersect1d(allowed, self._ids, assume_unique=True)
                short &= (ids >= 0).sum(1) < min(k, len(present))
                if short.any():
                    scores[short], ids[short] = self._exact_subset(q[short], k, present)
            return scores, ids
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._deleted_ids()))
        scores, ids = _search_with_params(self._index, q, k, self._search_params(selector))
        return _pad(scores, ids, k)

    def _search_params(self, selector):
        import faiss

        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.params["ef_search"], 256))
        if self.kind == "ivfpq":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.params["nprobe"])
        return faiss.SearchParameters(sel=selector)

    def _exact_subset(self, q: np.ndarray, k: int, ids: np.ndarray):
        if len(ids) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        vectors = self.reconstruct(ids)
        sims = q @ vectors.T
        top = min(k, len(ids))
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        order = np.take_along_axis(-sims, part, 1).argsort(1, kind="stable")
        best = np.take_along_axis(part, order, 1)
        return _pad(np.take_along_axis(sims, best, 1), ids[best], k)

    def set_search_effort(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall: HNSW ``efSearch``, IVF ``nprobe``."""
        if ef_search is not None and self.kind == "hnsw":
            self.params["ef_search"] = ef_search
            import faiss

            faiss.downcast_index(self._index.index).hnsw.efSearch = ef_search
        if nprobe is not None and self.kind == "ivfpq":
            self.params["nprobe"] = nprobe
            self._index.nprobe = nprobe

    def range_search(self, queries: np.ndarray, threshold: float):
        """All items with similarity ≥ ``threshold`` to each query: ``(lims, scores, ids)`` (FAISS layout)."""
        q = _as_matrix(queries, self.dim)
        index = self._index
        if self.device != "cpu":
            import faiss

            index = faiss.index_gpu_to_cpu(index)  # range search is CPU-only in FAISS
        lims, scores, ids = index.range_search(q, float(threshold))
        lims = lims.astype(np.int64)
        if self._deleted:
            keep = ~np.isin(ids, self._deleted_ids())
            counts = np.add.reduceat(keep, lims[:-1]) if len(ids) else np.zeros(len(q), int)
            counts = np.where(np.diff(lims) > 0, counts, 0)
            lims = np.concatenate([[0], np.cumsum(counts)])
            scores, ids = scores[keep], ids[keep]
        return lims, scores, ids

    # ---------------------------------------------------------------- persistence
    def to_bytes(self) -> bytes:
        """The FAISS index serialised (CPU form), removed HNSW nodes compacted away first."""
        import faiss

        self.compact()
        index = faiss.index_gpu_to_cpu(self._index) if self.device != "cpu" else self._index
        return faiss.serialize_index(index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, ids, *, kind: str, dim: int, params: dict, use_gpu: bool | str = "auto"):
        """Rebuild from :meth:`to_bytes` output and its ids; raises :class:`VectorIndexError` on
        corrupt data or a count that does not match."""
        import faiss

        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise VectorIndexError(f"the FAISS index data is corrupt ({str(exc).splitlines()[0][:200]})") from None
        ids = np.asarray(ids, dtype=np.int64)
        if index.d != dim or index.ntotal != len(ids):
            raise VectorIndexError(f"the FAISS index holds {index.ntotal} vectors of dimension {index.d}; "
                                   f"expected {len(ids)} of dimension {dim}")
        self = cls(dim, kind, use_gpu=False, **params)
        self._index, self._ids = index, ids.copy()
        if use_gpu and gpu_count() > 0 and kind != "hnsw":
            self._to_gpu()
        return self


def _pad(scores: np.ndarray, ids: np.ndarray, k: int):
    scores = np.asarray(scores, np.float32).copy()
    ids = np.asarray(ids, np.int64).copy()
    scores[ids < 0] = -np.inf
    if ids.shape[1] < k:
        n = len(ids)
        scores = np.hstack([scores, np.full((n, k - ids.shape[1]), -np.inf, np.float32)])
        ids = np.hstack([ids, np.full((n, k - ids.shape[1]), -1, np.int64)])
    return scores, ids
