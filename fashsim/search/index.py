"""FAISS vector index over L2-normalised embeddings: inner product = cosine similarity.

:class:`VectorIndex` wraps one FAISS index, built from a FAISS *factory string*
(``faiss.index_factory``, metric inner product), behind stable int64 item ids. The kinds are
names for factory strings, ``{nlist}``, ``{hnsw_m}`` and ``{pq_m}`` filled in from the parameters
(bytes a vector for 128-d float32 embeddings as saved, ids included; IVF kinds keep 8 B of id in
their lists and 16 B in the id → position hash table):

* ``flat`` — ``IDMap2,Flat``: exact search (520 B);
* ``hnsw`` — ``IDMap2,HNSW{hnsw_m},Flat``: graph search over the floats (~ 800 B with M = 32);
* ``ivfpq`` — ``IVF{nlist},PQ{pq_m}np``: inverted lists of product-quantised codes (pq_m + 24 B);
* ``ivfpq_refine`` — ``IDMap2,IVF{nlist},PQ{pq_m}np,Refine(SQ8)``: IVF-PQ shortlists
  ``k_factor·k`` candidates, re-ranked on 8-bit scalar-quantised copies of the vectors
  (pq_m + 144 B);
* ``ivfsq`` — ``IVF{nlist},SQ8``: inverted lists of 8-bit codes of each vector's residual to its
  list's centroid, scored directly (152 B);
* any other string is passed to ``index_factory`` as it is (``"HNSW16,SQ8"``, ``"IVF{nlist},SQfp16"``).

``np`` turns off FAISS's polysemous training of the PQ codebooks, which only serves
Hamming-distance pre-filtering (the ``ht`` setting, unused here) and takes most of the training
time (FAISS's ``IndexIVFPQ`` constructor, which fashsim used before, leaves it off too).

``auto`` (:func:`choose_kind`) picks by collection size: ``flat`` below :data:`AUTO_HNSW_FROM`,
``hnsw`` below :data:`AUTO_COMPACT_FROM`, ``ivfsq`` above (see those constants for why).
``benchmarks/bench_search.py`` measures every kind on 1 M vectors (reports/benchmarks/search.json).

Ids. IVF indexes keep the caller's ids in their inverted lists (``add_with_ids``, with a hash
table from id to list position for :meth:`~VectorIndex.reconstruct` and removal); every other
index is wrapped in ``IDMap2``, which maps FAISS's sequential positions to the ids. A factory
string without ``IDMap2`` gets it prepended.

Removal (:meth:`~VectorIndex.remove`) never rebuilds. Where FAISS can delete in place (IVF with
its own ids; ``IDMap2`` over flat codes: ``Flat``, ``SQ``, ``PQ``) it does; elsewhere (HNSW graphs,
``Refine``) the id becomes a *tombstone*: masked at search time, physically dropped by
:meth:`~VectorIndex.compact` (and before every save). :func:`removes_in_place` decides which
from the index's structure; :meth:`~VectorIndex._filtered_search` masks them.

Search-time settings (HNSW ``efSearch``, IVF ``nprobe``, refinement ``k_factor_rf``) are set with
``faiss.ParameterSpace``, which reaches through the ``IDMap2`` and ``Refine`` wrappers
(:meth:`~VectorIndex.set_search_effort`). FAISS saves them with the index.

Filters (``allowed_ids`` of :meth:`~VectorIndex.search`) and tombstones are ``IDSelector``\\ s
applied inside FAISS: :func:`search_with_selector` is the one place that builds the
``SearchParameters`` for them, with an exact fallback for the queries a very selective filter
leaves short of ``k`` results (:meth:`~VectorIndex._filtered_search`).

GPU. With faiss-gpu and a GPU (``use_gpu``), a GPU copy of the index answers unfiltered searches,
for the index types FAISS can clone to a GPU (``Flat``, IVF ones; not HNSW or ``Refine``).
FAISS GPU indexes ignore ``IDSelector``\\ s (faiss issues #3114, #3924), so filtered searches,
searches that must mask tombstones, range searches, reconstruction and serialisation always use
the CPU index, which stays the reference copy; additions go to both, removals refresh the GPU
copy. :attr:`~VectorIndex.device` says where unfiltered searches run.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FashsimError

FACTORIES = {
    "flat": "IDMap2,Flat",
    "hnsw": "IDMap2,HNSW{hnsw_m},Flat",
    "ivfpq": "IVF{nlist},PQ{pq_m}np",
    "ivfpq_refine": "IDMap2,IVF{nlist},PQ{pq_m}np,Refine(SQ8)",
    "ivfsq": "IVF{nlist},SQ8",
}
KINDS = (*FACTORIES, "auto")
#: Below this size ``auto`` searches exactly: 200 k × 128 floats are 100 MB, which one core scans
#: in about 10 ms a query (memory bandwidth), still fine for an interactive search.
AUTO_HNSW_FROM = 200_000
#: From this size ``auto`` builds the compact ``ivfsq``: HNSW32 over floats takes ~ 800 bytes a
#: vector (floats + 2·32 neighbour links of 4 bytes + id), ~ 4 GB at 5 M, against ~ 152 bytes.
#: ``ivfsq`` rather than ``ivfpq_refine``: on the 1 M benchmark it has the better recall (0.97 vs
#: 0.956), memory (30 % vs 34 % of flat), speed and build time, and deletes in place.
AUTO_COMPACT_FROM = 5_000_000
#: FAISS k-means warns below 39 training points a centroid (``ClusteringParameters.
#: min_points_per_centroid``): fewer give poorly placed centroids, so nlist is capped by it.
MIN_TRAINING_POINTS_PER_CENTROID = 39

#: Parameter defaults (see :class:`VectorIndex`). ``hnsw_m=32``, ``ef_construction=200``: the usual
#: HNSW choice for ~128-d vectors (FAISS's benchmarks, hnswlib's default build effort). ``pq_m=32``:
#: 4 dimensions a byte for 128-d (16× smaller than floats). ``nlist=None``: :func:`nlist_for`.
#: ``nprobe=32``: scans 32 / nlist of the collection a query (1.25 % at 1 M, nlist 2564 from a 100 k
#: training sample); the benchmark's clustered data saturates recall by nprobe 8, and 32 leaves room
#: for less clustered embeddings at ~ 4× the cost.
#: On the 1 M benchmark: ``ef_search=128`` reaches recall@10 0.9997 (0.965 at 32, 0.9965 at 64), a margin
#: for filtered searches, whose beam also holds items the filter drops; ``k_factor=32`` 0.956 (0.948 at
#: 16; 64 adds nothing: the 8-bit codes that re-rank cap it).
DEFAULT_PARAMS = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128, "nlist": None, "pq_m": 32, "nprobe": 32,
                  "k_factor": 32}  # fmt: skip
#: First ``k`` of a range search done as k-NN search (:meth:`VectorIndex._range_by_knn`): near-duplicate
#: thresholds keep a handful of items a query, so most queries need no second round.
RANGE_FIRST_K = 16
#: The FAISS names of the search-time settings (``ParameterSpace``), by keyword of this module.
SEARCH_SETTINGS = {"ef_search": "efSearch", "nprobe": "nprobe", "k_factor": "k_factor_rf"}


class VectorIndexError(FashsimError):
    """Misuse of an index (duplicate ids, wrong dimension, untrained IVF, ...)."""


def gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def choose_kind(n_items: int) -> str:
    """The ``auto`` rule: flat → hnsw → ivfsq as the collection grows (see :data:`AUTO_HNSW_FROM`)."""
    if n_items < AUTO_HNSW_FROM:
        return "flat"
    return "hnsw" if n_items < AUTO_COMPACT_FROM else "ivfsq"


def minimum_items(kind: str) -> int:
    """The fewest vectors an index ``kind`` can be trained on: 256 for product quantisation (its
    8-bit codebooks need a training vector per code), 1 otherwise."""
    factory = FACTORIES.get(kind, kind)
    return 256 if "PQ" in factory else 1


def nlist_for(n_items: int, n_train: int | None = None) -> int:
    """Number of IVF lists for a collection of ``n_items``: 4·√N, the low end of the FAISS guideline
    (4·√N to 16·√N: fewer lists train and assign faster, ``nprobe`` buys recall back), capped so the
    ``n_train`` training vectors give each centroid :data:`MIN_TRAINING_POINTS_PER_CENTROID`."""
    nlist = max(1, round(4 * math.sqrt(max(n_items, 1))))
    if n_train is not None:
        nlist = min(nlist, max(1, n_train // MIN_TRAINING_POINTS_PER_CENTROID))
    return nlist


def components(index) -> list:
    """The FAISS objects ``index`` is made of, outermost first: the wrappers (``IDMap2``,
    ``PreTransform``, ``Refine``: its base index) and what they wrap, each downcast."""
    import faiss

    parts = []
    while index is not None:
        index = faiss.downcast_index(index)
        parts.append(index)
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            index = index.index
        elif isinstance(index, faiss.IndexRefine):
            index = index.base_index
        else:
            index = None
    return parts


def removes_in_place(index) -> bool:
    """Whether FAISS deletes from ``index`` in place: IVF with its own ids, or ``IDMap2`` over flat
    codes (which shift down, as ``IDMap2`` expects). Elsewhere (HNSW, ``Refine``, ``IDMap2`` over an
    IVF) removal must be a tombstone."""
    import faiss

    parts = components(index)
    if isinstance(parts[0], faiss.IndexIVF):
        return True
    return len(parts) == 2 and isinstance(parts[0], faiss.IndexIDMap) and isinstance(parts[1], faiss.IndexFlatCodes)


def search_parameters(index, selector=None):
    """``SearchParameters`` for ``index`` that apply ``selector`` (over the caller's ids) where FAISS
    applies selectors, with the index's current search-time settings. Returns ``(params, keep)``:
    ``keep`` holds the objects the parameters point to, to be kept alive during the search.

    Hand-built rather than ``SearchParameters(sel=...)`` because FAISS replaces the index's settings
    by the parameters' defaults (e.g. ``nprobe=1``), IVF and ``Refine`` refuse parameters of another
    type, and ``IDMap2`` translates a selector only on the outermost parameters, which ``Refine``
    does not pass on to its base index: the selector is translated here with ``IDSelectorTranslated``.
    """
    import faiss

    index = faiss.downcast_index(index)
    keep = [selector]
    if isinstance(index, faiss.IndexIDMap):
        inner = faiss.IDSelectorTranslated(index, selector) if selector is not None else None
        params, more = search_parameters(index.index, inner)
        return params, [*keep, inner, *more]
    if isinstance(index, faiss.IndexPreTransform):
        params, more = search_parameters(index.index, selector)
        return params, [*keep, *more]
    if isinstance(index, faiss.IndexRefine):
        base, more = search_parameters(index.base_index, selector)
        params = faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=base)
        return params, [*keep, base, *more]
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(nprobe=index.nprobe, max_codes=index.max_codes)
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=index.hnsw.efSearch)
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params, keep


def search_with_selector(index, queries: np.ndarray, k: int, selector):
    """Top-``k`` search of a CPU index restricted by an ``IDSelector`` over the caller's ids (filters
    and tombstones both come through here). Never for a GPU index: those ignore selectors."""
    params, keep = search_parameters(index, selector)
    search = getattr(index, "search_numpy", None) or index.search  # see _plain_search
    result = search(queries, k, params=params)
    del keep
    return result


def _plain_search(index, queries: np.ndarray, k: int):
    """``index.search``, also when ``faiss.contrib.torch_utils`` (imported by e.g.
    pytorch-metric-learning) has replaced ``search`` by a torch-aware version."""
    search = getattr(index, "search_numpy", None) or index.search
    return search(queries, k)


def _clone_to_gpu(index, resources):
    """A GPU copy of a CPU index (a seam for tests, which inject a fake GPU index)."""
    import faiss

    return faiss.index_cpu_to_gpu(resources, 0, index)


def _gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


def as_vectors(vectors, dim: int) -> np.ndarray:
    """``vectors`` as float32 ``(N, dim)``: another dimension, or a NaN or infinite value (a
    broken embedding, which would otherwise rank first for every query or never be found), is
    refused with :class:`VectorIndexError`."""
    x = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
    if x.ndim != 2 or x.shape[1] != dim:
        raise VectorIndexError(f"expected vectors of dimension {dim}, got shape {np.shape(vectors)}")
    broken = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if broken.size:
        raise VectorIndexError(
            f"{broken.size} of {len(x)} vectors hold NaN or infinite values (rows {broken[:5].tolist()}): "
            "they cannot be indexed or searched"
        )
    return x


def unit_vectors(vectors, dim: int) -> np.ndarray:
    """:func:`as_vectors`, L2-normalised row by row (inner product = cosine similarity, whatever
    the scale an embedding came with); a zero vector has no direction and is refused."""
    x = as_vectors(vectors, dim)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise VectorIndexError(f"{int((norms == 0).sum())} vectors are all zeros: they have no direction to compare")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _as_ids(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())


def as_ids(ids) -> np.ndarray:
    """Ids of items to add as int64; negative ones are refused (FAISS answers -1 for "no result")."""
    ids = _as_ids(ids)
    if (ids < 0).any():
        raise VectorIndexError(f"item ids must be ≥ 0, got {ids[ids < 0][:5].tolist()}")
    return ids


class VectorIndex:
    """A FAISS index with stable ids, removal, filters and optional GPU (see the module docstring).

    ``kind``: one of :data:`FACTORIES` or a FAISS factory string. Construction parameters:
    ``hnsw_m`` (graph degree), ``ef_construction``, ``nlist`` (IVF lists; default :func:`nlist_for`
    the collection size, decided at :meth:`train`), ``pq_m`` (bytes of a PQ code; must divide the
    dimension). Search-time settings, changeable later with :meth:`set_search_effort`:
    ``ef_search``, ``nprobe``, ``k_factor``. :data:`DEFAULT_PARAMS` explains the defaults.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        hnsw_m: int = DEFAULT_PARAMS["hnsw_m"],
        ef_construction: int = DEFAULT_PARAMS["ef_construction"],
        ef_search: int = DEFAULT_PARAMS["ef_search"],
        nlist: int | None = None,
        pq_m: int = DEFAULT_PARAMS["pq_m"],
        nprobe: int = DEFAULT_PARAMS["nprobe"],
        k_factor: int = DEFAULT_PARAMS["k_factor"],
        use_gpu: bool | str = "auto",
    ) -> None:
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search, "nlist": nlist,
                  "pq_m": pq_m, "nprobe": nprobe, "k_factor": k_factor}  # fmt: skip
        self._setup(dim, kind, params, use_gpu)
        if kind in ("ivfpq", "ivfpq_refine") and self.dim % pq_m:
            raise VectorIndexError(f"pq_m={pq_m} must divide the dimension {self.dim}")
        if "{nlist}" not in self.template or nlist is not None:
            self._build(nlist)  # IVF kinds without nlist wait for train(), which knows the sizes

    def _setup(self, dim: int, kind: str, params: dict, use_gpu: bool | str) -> None:
        if kind == "auto":
            raise ValueError("resolve kind 'auto' with choose_kind(n_items) first")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be one of {', '.join(FACTORIES)} or a FAISS factory string, got {kind!r}")
        if use_gpu is True and gpu_count() == 0:
            raise VectorIndexError("use_gpu=True but FAISS sees no GPU (install faiss-gpu and check the driver)")
        self.dim, self.kind, self.params = int(dim), kind, params
        self.factory: str | None = None  # the factory string actually built (None until built)
        self._index = None  # the CPU index: the reference copy
        self._ids = np.empty(0, np.int64)  # live ids, sorted, kept in step with the FAISS index
        self._tombstones = np.empty(0, np.int64)  # removed ids still inside the FAISS index (sorted)
        self._use_gpu = bool(use_gpu) and gpu_count() > 0
        self._gpu_index = None
        self._gpu_res = None

    # ---------------------------------------------------------------- construction
    @property
    def template(self) -> str:
        """The factory string of :attr:`kind`, placeholders unfilled."""
        return FACTORIES.get(self.kind, self.kind)

    def _build(self, nlist: int | None) -> None:
        import faiss

        p = self.params
        p["nlist"] = nlist
        factory = self.template.format(nlist=nlist, hnsw_m=p["hnsw_m"], pq_m=p["pq_m"])
        index = _from_factory(self.dim, factory)
        if not isinstance(index, faiss.IndexIVF) and not isinstance(index, faiss.IndexIDMap2):
            factory = "IDMap2," + factory.removeprefix("IDMap,")  # ids through IDMap2 (see the module doc)
            index = _from_factory(self.dim, factory)
        if isinstance(index, faiss.IndexIVF):
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # arbitrary ids: remove + reconstruct
        self._index, self.factory = index, factory
        self._apply({"efConstruction": p["ef_construction"]}, strict=False)
        self._apply({SEARCH_SETTINGS[name]: p[name] for name in SEARCH_SETTINGS}, strict=False)
        self._sync_gpu()

    def _apply(self, settings: dict, *, strict: bool) -> None:
        """Set FAISS parameters with ``ParameterSpace`` on whatever part of the index takes them;
        ``strict``: raise for one that no part takes (else skip it: e.g. ``efSearch`` of a flat index)."""
        import faiss

        space = faiss.ParameterSpace()
        for name, value in settings.items():
            if value is None:
                continue
            try:
                space.set_index_parameter(self._index, name, value)
            except RuntimeError as exc:
                if "could not set parameter" not in str(exc):
                    raise
                if strict:
                    raise VectorIndexError(f"the {self.kind} index ({self.factory}) has no {name} setting") from None

    @property
    def needs_training(self) -> bool:
        """True until :meth:`train` has run for a kind that learns from data (IVF, PQ)."""
        return self._index is None or not self._index.is_trained

    def train(self, sample: np.ndarray, n_items: int | None = None) -> None:
        """Learn what the index needs (IVF centroids, PQ / SQ codebooks) from a sample of vectors;
        ``n_items``: the expected collection size, for the default ``nlist`` (default: the sample's)."""
        x = unit_vectors(sample, self.dim)
        if self._index is None:
            self._build(self.params["nlist"] or nlist_for(n_items or len(x), len(x)))
        if not self._index.is_trained:
            try:
                self._index.train(x)
            except RuntimeError as exc:  # e.g. PQ codebooks: "Number of training points (24) should be at least ..."
                reason = next((line for line in str(exc).splitlines() if "Error" in line), str(exc))[-300:]
                raise VectorIndexError(
                    f"a {self.kind} index cannot be trained on {len(x)} vectors ({reason.strip()}); "
                    f"small collections want kind='flat' (exact) or 'hnsw'"
                ) from None
            self._sync_gpu()

    # ---------------------------------------------------------------- GPU copy
    @property
    def device(self) -> str:
        """Where unfiltered searches run: ``"cuda:0"`` or ``"cpu"``."""
        return "cuda:0" if self._gpu_index is not None else "cpu"

    def _sync_gpu(self) -> None:
        """(Re)make the GPU copy of the CPU index, where FAISS can clone this index type to a GPU."""
        self._gpu_index = None
        if not self._use_gpu or self._index is None or not self._index.is_trained:
            return
        if self._gpu_res is None:
            self._gpu_res = _gpu_resources()
        try:
            self._gpu_index = _clone_to_gpu(self._index, self._gpu_res)
        except RuntimeError:  # "not implemented on GPU" (HNSW, Refine, ...): the CPU index serves
            self._gpu_index = None

    # ---------------------------------------------------------------- content
    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """All live ids, sorted."""
        return self._ids.copy()

    def __contains__(self, item_id: int) -> bool:
        return bool(self._live(np.asarray([item_id], np.int64))[0])

    def _live(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are in the index (binary search in the sorted live ids)."""
        if not len(self._ids):
            return np.zeros(len(ids), bool)
        return self._ids[np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)] == ids

    def add(self, vectors: np.ndarray, ids) -> None:
        """Add vectors under new ids; ids already present raise (use :meth:`upsert`)."""
        x = unit_vectors(vectors, self.dim)
        ids = as_ids(ids)
        if len(ids) != len(x):
            raise VectorIndexError(f"{len(x)} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise VectorIndexError("the ids to add contain duplicates")
        present = ids[self._live(ids)]
        if present.size:
            raise VectorIndexError(f"{present.size} ids are already in the index (e.g. {present[:5].tolist()}): "
                                   "remove them first or use upsert()")  # fmt: skip
        if self.needs_training:
            raise VectorIndexError(f"the {self.kind} index must be trained first: call train(sample)")
        if np.isin(ids, self._tombstones).any():  # an id removed earlier comes back: drop its old entry first
            self.compact()
        self._index.add_with_ids(x, ids)
        if self._gpu_index is not None:
            self._gpu_index.add_with_ids(x, ids)
        self._ids = np.sort(np.concatenate([self._ids, ids]))

    def upsert(self, vectors: np.ndarray, ids) -> None:
        """Add, replacing the vectors of ids that are already present."""
        self.remove(ids, missing_ok=True)
        self.add(vectors, ids)

    def remove(self, ids, *, missing_ok: bool = False) -> int:
        """Remove ids without rebuilding (in place or as tombstones: see the module docstring);
        returns how many were removed."""
        import faiss

        ids = _as_ids(ids)
        present = np.unique(ids[self._live(ids)])
        if not missing_ok and len(present) != len(np.unique(ids)):
            missing = np.setdiff1d(ids, present)
            raise VectorIndexError(f"{missing.size} ids are not in the index (e.g. {missing[:5].tolist()})")
        if present.size == 0:
            return 0
        if not removes_in_place(self._index):
            self._tombstones = np.union1d(self._tombstones, present)  # searches mask them; the GPU copy may keep them
        else:
            if isinstance(self._index, faiss.IndexIVF):  # its id hash table accepts only an IDSelectorArray
                self._index.remove_ids(faiss.IDSelectorArray(present))
            else:
                self._index.remove_ids(faiss.IDSelectorBatch(present))
            self._sync_gpu()
        self._ids = self._ids[~np.isin(self._ids, present)]
        return int(present.size)

    def compact(self) -> None:
        """Drop the tombstones for good: the index is emptied (keeping what it learnt in training) and
        refilled with the live vectors, as stored (lossy kinds re-encode their decoded vectors)."""
        if not self._tombstones.size:
            return
        live = self._ids
        vectors = self.reconstruct(live)
        self._index.reset()
        self._tombstones = np.empty(0, np.int64)
        if len(live):
            self._index.add_with_ids(vectors, live)
        self._sync_gpu()

    def reconstruct(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (decoded from their codes for lossy kinds)."""
        ids = _as_ids(ids)
        if len(ids) == 0:
            return np.empty((0, self.dim), np.float32)
        missing = ids[~self._live(ids)]
        if missing.size:
            raise VectorIndexError(f"{missing.size} ids are not in the index (e.g. {missing[:5].tolist()})")
        return self._index.reconstruct_batch(ids)

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, *, allowed_ids=None,
               filter_strategy: str = "auto") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-``k`` by inner product: ``(scores, ids)`` of shape ``(n_queries, k)``, best first,
        padded with score ``-inf`` and id ``-1`` when fewer items qualify.

        ``allowed_ids`` restricts results to those ids (category filters and the like): through a
        FAISS IDSelector (``filter_strategy="selector"``, the fastest: see ``bench_search.py``), by
        exact search over just those ids (``"exact"``), or ``"auto"``: the selector, then an exact
        search for the queries it left short of ``k`` (see :meth:`_filtered_search`).
        """
        q = unit_vectors(queries, self.dim)
        if k <= 0:
            raise VectorIndexError(f"k must be positive, got {k}")
        if filter_strategy not in ("auto", "exact", "selector"):
            raise ValueError(f"filter_strategy must be auto, exact or selector, got {filter_strategy!r}")
        if self._index is None or len(self) == 0:
            return _empty(len(q), k)
        if allowed_ids is None and not self._tombstones.size:
            index = self._gpu_index if self._gpu_index is not None else self._index
            return _pad(*_plain_search(index, q, k), k)
        return self._filtered_search(q, k, allowed_ids, filter_strategy)

    def _filtered_search(self, q: np.ndarray, k: int, allowed_ids, strategy: str):
        """Search restricted to ``allowed_ids`` (``None``: all live ids, i.e. only masking tombstones),
        on the CPU index whatever :attr:`device` is (FAISS GPU indexes ignore selectors).

        ``"auto"`` redoes exactly the queries left with fewer than ``min(k, matches)`` results: IVF
        scans only ``nprobe`` lists, which may hold fewer than ``k`` allowed items, and HNSW's search
        stops after ``efSearch`` candidates, however few of them are allowed.
        """
        import faiss

        if allowed_ids is None:
            candidates = self._ids
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones))
        else:
            candidates = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            candidates = candidates[self._live(candidates)]  # tombstones and unknown ids out
            selector = faiss.IDSelectorBatch(candidates)
        if strategy == "exact":
            return self._exact_subset(q, k, candidates)
        scores, ids = _pad(*search_with_selector(self._index, q, k, selector), k)
        short = (ids >= 0).sum(1) < min(k, len(candidates))
        if strategy == "auto" and short.any():
            scores[short], ids[short] = self._exact_subset(q[short], k, candidates)
        return scores, ids

    def _exact_subset(self, q: np.ndarray, k: int, ids: np.ndarray):
        if len(ids) == 0:
            return _empty(len(q), k)
        vectors = self.reconstruct(ids)
        sims = q @ vectors.T
        top = min(k, len(ids))
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        order = np.take_along_axis(-sims, part, 1).argsort(1, kind="stable")
        best = np.take_along_axis(part, order, 1)
        return _pad(np.take_along_axis(sims, best, 1), ids[best], k)

    def set_search_effort(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          k_factor: int | None = None) -> None:  # fmt: skip
        """Trade speed for recall: HNSW ``efSearch``, IVF ``nprobe``, refinement ``k_factor`` (the
        refined index re-ranks ``k_factor·k`` candidates), set with FAISS's ``ParameterSpace``.
        A setting the index has no use for raises :class:`VectorIndexError`."""
        given = {"ef_search": ef_search, "nprobe": nprobe, "k_factor": k_factor}
        given = {name: value for name, value in given.items() if value is not None}
        if self._index is None:  # not built yet: applied when it is
            self.params.update(given)
            return
        self._apply({SEARCH_SETTINGS[name]: value for name, value in given.items()}, strict=True)
        self.params.update(given)
        if given:
            self._sync_gpu()

    def range_search(self, queries: np.ndarray, threshold: float):
        """All items with similarity ≥ ``threshold`` to each query: ``(lims, scores, ids)`` (FAISS layout),
        on the CPU index (FAISS GPU indexes have no range search). Indexes with a ``Refine`` go
        through k-NN search (:meth:`_range_by_knn`): FAISS's ``IndexRefine.range_search`` scores the
        base index's candidates within ``threshold·k_factor`` (FAISS ≥ 1.15), which for
        similarities narrows the search instead of widening it."""
        import faiss

        q = unit_vectors(queries, self.dim)
        if self._index is None or len(self) == 0:
            return np.zeros(len(q) + 1, np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
        if any(isinstance(part, faiss.IndexRefine) for part in components(self._index)):
            return self._range_by_knn(q, float(threshold))
        lims, scores, ids = self._index.range_search(q, float(threshold))
        lims = lims.astype(np.int64)
        if self._tombstones.size:
            keep = ~np.isin(ids, self._tombstones)
            counts = np.add.reduceat(keep, lims[:-1]) if len(ids) else np.zeros(len(q), int)
            counts = np.where(np.diff(lims) > 0, counts, 0)
            lims = np.concatenate([[0], np.cumsum(counts)])
            scores, ids = scores[keep], ids[keep]
        return lims, scores, ids

    def _range_by_knn(self, q: np.ndarray, threshold: float):
        """Range search as k-NN search: rows whose k-th result still reaches ``threshold`` are
        searched again with twice ``k``, from :data:`RANGE_FIRST_K`."""
        found: list = [None] * len(q)
        pending, k = np.arange(len(q)), RANGE_FIRST_K
        while pending.size:
            k = min(k, len(self))
            scores, ids = self.search(q[pending], k)
            done = (scores[:, -1] < threshold) | (k == len(self))
            for row, row_scores, row_ids in zip(pending[done], scores[done], ids[done]):
                keep = (row_scores >= threshold) & (row_ids >= 0)
                found[row] = (row_scores[keep], row_ids[keep])
            pending, k = pending[~done], 2 * k
        lims = np.concatenate([[0], np.cumsum([len(ids) for _, ids in found])]).astype(np.int64)
        scores = np.concatenate([s for s, _ in found]).astype(np.float32)
        return lims, scores, np.concatenate([i for _, i in found]).astype(np.int64)

    # ---------------------------------------------------------------- persistence
    def to_bytes(self) -> bytes:
        """The FAISS index serialised, tombstones compacted away first. Always the CPU index: a GPU
        copy is never serialised (it would need ``index_gpu_to_cpu`` and could not hold more)."""
        import faiss

        if self._index is None:
            raise VectorIndexError(f"the {self.kind} index is not built yet: call train(sample) first")
        self.compact()
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, ids, *, kind: str, dim: int, params: dict, factory: str | None = None,
                   use_gpu: bool | str = "auto") -> VectorIndex:  # fmt: skip
        """Rebuild from :meth:`to_bytes` output and its ids; raises :class:`VectorIndexError` on
        corrupt data or a count that does not match. ``factory``: the factory string saved with it
        (collections saved before it was recorded have only ``kind`` and ``params``)."""
        import faiss

        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise VectorIndexError(f"the FAISS index data is corrupt ({str(exc).splitlines()[0][:200]})") from None
        ids = np.asarray(ids, dtype=np.int64)
        if index.d != dim or index.ntotal != len(ids):
            raise VectorIndexError(f"the FAISS index holds {index.ntotal} vectors of dimension {index.d}; "
                                   f"expected {len(ids)} of dimension {dim}")  # fmt: skip
        if not isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap2)):
            raise VectorIndexError(f"the FAISS index ({type(index).__name__}) keeps no ids (IDMap2 or IVF expected)")
        self = cls.__new__(cls)
        known = {name: value for name, value in params.items() if name in DEFAULT_PARAMS}
        self._setup(dim, kind, {**DEFAULT_PARAMS, **known}, use_gpu)
        if isinstance(index, faiss.IndexIVF) and index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._index, self._ids = index, np.sort(ids)
        self.factory = factory or self.template.format(**self.params)
        self._sync_gpu()
        return self


def _from_factory(dim: int, factory: str):
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = next((line for line in str(exc).splitlines() if "Error" in line), str(exc))[:200]
        raise ValueError(f"{factory!r} is neither an index kind ({', '.join(KINDS)}) nor a FAISS factory string "
                         f"({reason})") from None  # fmt: skip


def _empty(n: int, k: int):
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int):
    scores = np.asarray(scores, np.float32).copy()
    ids = np.asarray(ids, np.int64).copy()
    scores[ids < 0] = -np.inf
    if ids.shape[1] < k:
        n = len(ids)
        scores = np.hstack([scores, np.full((n, k - ids.shape[1]), -np.inf, np.float32)])
        ids = np.hstack([ids, np.full((n, k - ids.shape[1]), -1, np.int64)])
    return scores, ids
