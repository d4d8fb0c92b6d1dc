"""Index kinds as FAISS factory strings, ParameterSpace settings, tombstones, re-ranking, filters on
a (fake) GPU index and loading collections saved before the factory string was recorded."""

import json

import faiss
import numpy as np
import pytest

from fashsim.fileio import sha256_file
from fashsim.search import collection as coll
from fashsim.search import index as index_module
from fashsim.search.index import (
    FACTORIES,
    VectorIndex,
    VectorIndexError,
    components,
    nlist_for,
    removes_in_place,
    search_parameters,
)

DIM = 32
N = 4000
IDS = np.arange(N) * 3 + 1000  # not positions: a missed id translation shows


def clustered(n=N, dim=DIM, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def x():
    return clustered()


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """These indexes are tiny: on a shared machine FAISS's OpenMP threads wait on each other far
    longer than the work takes (k-means of 4 000 points: ~ 3 s on one thread, 10 s on two)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def exact_top(x, queries, k, allowed=None):
    pool = IDS if allowed is None else np.asarray(allowed)
    sims = queries @ x[np.searchsorted(IDS, pool)].T
    return pool[np.argsort(-sims, axis=1)[:, :k]]


def built(kind, x, use_gpu="auto", **params):
    index = VectorIndex(DIM, kind, use_gpu=use_gpu, **{"pq_m": 16, **params})
    if index.needs_training:
        index.train(x, n_items=len(x))
    index.add(x, IDS)
    return index


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


# ---------------------------------------------------------------- kinds and factory strings
def test_kinds_are_factory_strings_and_ids_are_handled_by_structure(x):
    flat, hnsw, ivfpq, refine, ivfsq = (built(kind, x) for kind in ("flat", "hnsw", "ivfpq", "ivfpq_refine", "ivfsq"))
    assert flat.factory == "IDMap2,Flat" and hnsw.factory == "IDMap2,HNSW32,Flat"
    nlist = nlist_for(len(x), len(x))
    assert ivfpq.factory == f"IVF{nlist},PQ16np" and refine.factory == f"IDMap2,IVF{nlist},PQ16np,Refine(SQ8)"
    assert ivfsq.factory == f"IVF{nlist},SQ8" and ivfpq.params["nlist"] == nlist
    kinds = [[type(part).__name__ for part in components(i._index)] for i in (flat, hnsw, ivfpq, refine, ivfsq)]
    assert kinds == [["IndexIDMap2", "IndexFlat"], ["IndexIDMap2", "IndexHNSWFlat"], ["IndexIVFPQ"],
                     ["IndexIDMap2", "IndexRefine", "IndexIVFPQ"], ["IndexIVFScalarQuantizer"]]  # fmt: skip
    assert [removes_in_place(i._index) for i in (flat, hnsw, ivfpq, refine, ivfsq)] == [True, False, True, False, True]
    for index in (flat, hnsw, ivfpq, refine, ivfsq):
        assert index.search(x[5:6], 1)[1][0, 0] == IDS[5]
        assert np.allclose(index.reconstruct(IDS[[5, 9]]), x[[5, 9]], atol=0.15)


def test_any_factory_string_gets_ids_and_placeholders(x):
    graph = built("HNSW16,SQ8", x)  # no IDMap2 in it: prepended
    assert graph.factory == "IDMap2,HNSW16,SQ8" and graph.kind == "HNSW16,SQ8"
    assert recall(graph.search(x[:50], 10)[1], exact_top(x, x[:50], 10)) > 0.9
    ivf = built("IVF{nlist},SQfp16", x)
    assert ivf.factory == f"IVF{nlist_for(len(x), len(x))},SQfp16" and removes_in_place(ivf._index)
    assert built("IDMap,Flat", x).factory == "IDMap2,Flat"  # IDMap2: reconstruct needs the reverse map
    with pytest.raises(ValueError, match="neither an index kind"):
        VectorIndex(DIM, "Flatt")
    with pytest.raises(ValueError, match="choose_kind"):
        VectorIndex(DIM, "auto")


def test_nlist_rule_follows_the_faiss_guideline_and_the_training_sample():
    assert nlist_for(1_000_000) == 4000  # 4·√N
    assert nlist_for(1_000_000, 100_000) == 100_000 // 39  # ≥ 39 training points a centroid
    assert nlist_for(10) == 13 and nlist_for(10, 10) == 1


# ---------------------------------------------------------------- ParameterSpace settings
def test_search_settings_reach_through_wrappers_and_are_saved(x):
    hnsw = built("hnsw", x, ef_search=40)
    assert faiss.downcast_index(hnsw._index.index).hnsw.efSearch == 40
    hnsw.set_search_effort(ef_search=77)
    assert faiss.downcast_index(hnsw._index.index).hnsw.efSearch == 77 and hnsw.params["ef_search"] == 77
    refine = built("ivfpq_refine", x, nprobe=3, k_factor=5)
    _, rf, ivf = components(refine._index)
    assert (ivf.nprobe, rf.k_factor) == (3, 5)
    refine.set_search_effort(nprobe=9, k_factor=12)
    assert (ivf.nprobe, rf.k_factor) == (9, 12)
    with pytest.raises(VectorIndexError, match="no efSearch"):
        refine.set_search_effort(ef_search=10)
    with pytest.raises(VectorIndexError, match="no nprobe"):
        built("flat", x).set_search_effort(nprobe=4)
    again = VectorIndex.from_bytes(refine.to_bytes(), IDS, kind="ivfpq_refine", dim=DIM, params=refine.params)
    _, rf2, ivf2 = components(again._index)
    assert (ivf2.nprobe, rf2.k_factor) == (9, 12) and again.factory == refine.factory
    params, keep = search_parameters(again._index, faiss.IDSelectorBatch(IDS[:10]))
    ivf_params = [p for p in keep if isinstance(p, faiss.SearchParametersIVF)]
    assert params.k_factor == 12 and [p.nprobe for p in ivf_params] == [9]
    assert any(isinstance(p, faiss.IDSelectorTranslated) for p in keep)  # user ids → IDMap2 positions


def test_filtered_search_keeps_the_search_effort(x):
    ivf = built("ivfpq", x, nprobe=1)
    rare = IDS[::97]  # ~ 1 % of the items, spread over all lists
    short = ivf.search(x[:20], 10, allowed_ids=rare, filter_strategy="selector")[1]
    assert (short >= 0).sum(1).min() < 10  # nprobe=1 visits too few lists for such a filter ...
    ivf.set_search_effort(nprobe=ivf.params["nlist"])
    full = ivf.search(x[:20], 10, allowed_ids=rare, filter_strategy="selector")[1]
    assert (full >= 0).all() and np.isin(full, rare).all()  # ... all lists: the filter's params carry nprobe


# ---------------------------------------------------------------- re-ranking
def test_refine_reranks_ivfpq_candidates(x):
    truth = exact_top(x, x[:200], 10)
    ivfpq = built("ivfpq", x, pq_m=4, nprobe=16)
    refine = built("ivfpq_refine", x, pq_m=4, nprobe=16, k_factor=1)
    plain = recall(refine.search(x[:200], 10)[1], truth)
    refine.set_search_effort(k_factor=16)
    reranked = recall(refine.search(x[:200], 10)[1], truth)
    sq8 = faiss.index_factory(DIM, "SQ8", faiss.METRIC_INNER_PRODUCT)  # what the re-ranking codes allow
    sq8.train(x)
    sq8.add(x)
    ceiling = recall(IDS[sq8.search(x[:200], 10)[1]], truth)
    assert reranked >= ceiling - 0.01 and ceiling > 0.9
    assert recall(ivfpq.search(x[:200], 10)[1], truth) < 0.5 and plain < 0.5
    scores, found = refine.search(x[:5], 3)
    assert np.allclose(scores, np.take_along_axis(x[:5] @ x.T, np.searchsorted(IDS, found), 1), atol=0.02)


@pytest.mark.parametrize("kind", ["ivfpq_refine", "hnsw", "ivfsq"])
def test_filters_translate_ids_through_every_wrapper(kind, x):
    index = built(kind, x, k_factor=16, nprobe=64)
    allowed = IDS[(np.arange(len(IDS)) % 7) == 3]
    _, found = index.search(x[:30], 10, allowed_ids=allowed, filter_strategy="selector")
    assert np.isin(found[found >= 0], allowed).all() and (found >= 0).mean() > 0.9
    _, found = index.search(x[:30], 10, allowed_ids=allowed)  # auto: the short rows completed exactly
    assert np.isin(found, allowed).all() and recall(found, exact_top(x, x[:30], 10, allowed)) > 0.9


# ---------------------------------------------------------------- tombstones
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq_refine"])
def test_tombstones_are_masked_everywhere_and_compacted(kind, x):
    index = built(kind, x, k_factor=16, nprobe=64)
    gone = IDS[:40]
    assert index.remove(gone) == 40
    assert set(index._tombstones.tolist()) == set(gone.tolist()) and len(index) == len(x) - 40
    assert not np.isin(index.search(x[:40], 10)[1], gone).any()
    assert not np.isin(index.search(x[:40], 10, allowed_ids=IDS[:80])[1], gone).any()
    lims, _, ids = index.range_search(x[:40], 0.999)
    assert not np.isin(ids, gone).any() and lims[-1] == len(ids)
    with pytest.raises(VectorIndexError, match="not in the index"):
        index.reconstruct(gone[:1])
    index.add(x[:1], gone[:1])  # a removed id comes back: its old entry is compacted away first
    assert not index._tombstones.size and index._index.ntotal == len(x) - 39
    assert index.search(x[:1], 1)[1][0, 0] == gone[0]
    index.remove(IDS[100:110])
    data = index.to_bytes()  # saving compacts
    assert not index._tombstones.size and index._index.ntotal == len(index)
    again = VectorIndex.from_bytes(data, index.ids(), kind=kind, dim=DIM, params=index.params, factory=index.factory)
    assert (again.search(x[200:210], 5)[1] == index.search(x[200:210], 5)[1]).all()


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "ivfsq"])
def test_in_place_removal_leaves_no_tombstones(kind, x):
    index = built(kind, x)
    index.remove(IDS[:10])
    assert not index._tombstones.size and index._index.ntotal == len(x) - 10
    assert not np.isin(index.search(x[:10], 5)[1], IDS[:10]).any()


def test_near_duplicates_through_refine_range_search(x):
    y = x.copy()
    y[11] = y[10]
    records = [{"id": int(i), "source": f"{i}.png", "category": "c"} for i in IDS]
    c = coll.Collection.build(y, records, kind="ivfpq_refine", pq_m=16)
    pairs = c.near_duplicate_pairs(0.995)
    assert (IDS[10], IDS[11]) in [p[:2] for p in pairs]
    flat = coll.Collection.build(y, records, kind="flat")
    assert {p[:2] for p in pairs} == {p[:2] for p in flat.near_duplicate_pairs(0.995)}


# ---------------------------------------------------------------- GPU (faked on the CPU)
class FakeGpuIndex:
    """Stands in for a FAISS GPU index: searches a CPU clone and, like FAISS GPU indexes (faiss
    issues #3114, #3924), ignores the SearchParameters' IDSelector."""

    def __init__(self, cpu_index):
        kinds = components(cpu_index)
        if any(isinstance(p, (faiss.IndexHNSW, faiss.IndexRefine)) for p in kinds):
            raise RuntimeError("This index type is not implemented on GPU.")
        self.cpu = faiss.clone_index(cpu_index)
        self.searches = 0

    def search(self, queries, k, params=None):
        self.searches += 1
        return self.cpu.search(queries, k)  # params ignored, selector included

    def add_with_ids(self, vectors, ids):
        self.cpu.add_with_ids(vectors, ids)


@pytest.fixture
def fake_gpu(monkeypatch):
    clones = []

    def clone(index, resources):
        clones.append(FakeGpuIndex(index))
        return clones[-1]

    monkeypatch.setattr(index_module, "gpu_count", lambda: 1)
    monkeypatch.setattr(index_module, "_gpu_resources", lambda: "resources")
    monkeypatch.setattr(index_module, "_clone_to_gpu", clone)
    return clones


@pytest.mark.parametrize("kind", ["flat", "ivfsq"])
def test_filtered_search_on_a_gpu_index_runs_on_the_cpu_copy(kind, x, fake_gpu):
    index = built(kind, x, nprobe=64)
    gpu = fake_gpu[-1]
    assert index.device == "cuda:0" and index._gpu_index is gpu
    allowed = IDS[(np.arange(len(IDS)) % 10) == 4]
    leaky = gpu.search(x[:20], 10, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed)))[1]
    assert not np.isin(leaky, allowed).all()  # the fake, like a GPU index, would return other ids
    before = gpu.searches
    _, found = index.search(x[:20], 10, allowed_ids=allowed)
    assert np.isin(found, allowed).all() and (found >= 0).all() and gpu.searches == before
    assert recall(index.search(x[:20], 10)[1], exact_top(x, x[:20], 10)) > 0.9 and gpu.searches == before + 1
    index.add(-x[:1], [7])  # additions reach the GPU copy
    assert gpu.search(-x[:1], 1)[1][0, 0] == 7 and index.search(-x[:1], 1)[1][0, 0] == 7
    index.remove([7, IDS[3]])  # removals refresh it
    assert fake_gpu[-1] is not gpu and index._gpu_index is fake_gpu[-1]
    assert not np.isin(index.search(np.vstack([-x[:1], x[3:4]]), 5)[1], [7, IDS[3]]).any()
    data = index.to_bytes()  # serialised from the CPU index, never from the GPU copy
    assert data == faiss.serialize_index(index._index).tobytes()
    again = VectorIndex.from_bytes(data, index.ids(), kind=kind, dim=DIM, params=index.params, use_gpu="auto")
    assert again.device == "cuda:0"
    assert (again.search(x[:5], 5)[1] == index.search(x[:5], 5)[1]).all()


def test_indexes_faiss_cannot_clone_to_a_gpu_stay_on_the_cpu(x, fake_gpu):
    for kind in ("hnsw", "ivfpq_refine"):
        index = built(kind, x, use_gpu=True)
        assert index.device == "cpu" and index._gpu_index is None
    assert built("ivfpq", x, use_gpu=False).device == "cpu"


@pytest.mark.skipif(index_module.gpu_count() == 0, reason="needs faiss-gpu and a GPU")
@pytest.mark.parametrize("kind", ["flat", "ivfpq", "ivfsq"])
def test_real_gpu_filtered_search_and_serialisation(kind, x):
    index = VectorIndex(DIM, kind, pq_m=16, nprobe=64, use_gpu=True)
    if index.needs_training:
        index.train(x, n_items=len(x))
    index.add(x, IDS)
    assert index.device == "cuda:0"
    allowed = IDS[(np.arange(len(IDS)) % 10) == 4]
    assert np.isin(index.search(x[:20], 10, allowed_ids=allowed)[1], allowed).all()
    again = VectorIndex.from_bytes(index.to_bytes(), index.ids(), kind=kind, dim=DIM, params=index.params)
    assert recall(again.search(x[:20], 10)[1], index.search(x[:20], 10)[1]) > 0.95


# ---------------------------------------------------------------- collections saved by the previous code
def old_faiss_index(kind, x, ids):
    """The FAISS index as fashsim built it by hand before factory strings."""
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efSearch = 128
        index = faiss.IndexIDMap2(base)
    else:
        quantizer = faiss.IndexFlatIP(DIM)  # the Python wrapper keeps it alive with the index
        index = faiss.IndexIVFPQ(quantizer, DIM, 102, 16, 8, faiss.METRIC_INNER_PRODUCT)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.train(x)
        index.nprobe = 64
    index.add_with_ids(x, ids)
    return index


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_collections_saved_before_factory_strings_still_load(kind, x, tmp_path):
    records = [{"id": int(i), "source": f"{i}.png", "category": f"c{i % 3}"} for i in IDS]
    c = coll.Collection.build(x, records, kind="flat")
    version = c.save(tmp_path / "idx")
    (version / "vectors.faiss").write_bytes(faiss.serialize_index(old_faiss_index(kind, x, IDS)).tobytes())
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["factory"]
    manifest["kind"] = kind
    manifest["params"] = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128, "nprobe": 64, "pq_m": 16,
                          "nlist": 102 if kind == "ivfpq" else None}  # fmt: skip
    manifest["sha256"]["vectors.faiss"] = sha256_file(version / "vectors.faiss")
    (version / "manifest.json").write_text(json.dumps(manifest))
    loaded = coll.Collection.load(tmp_path / "idx")
    assert loaded.index.kind == kind and loaded.index.factory == FACTORIES[kind].format(**loaded.index.params)
    hits = loaded.search(x[:50], 10)
    assert recall([[h.id for h in row] for row in hits], exact_top(x, x[:50], 10)) > 0.7
    assert all(h.category == "c1" for row in loaded.search(x[:5], 10, category="c1") for h in row)
    loaded.remove([IDS[0]])
    assert IDS[0] not in [h.id for h in loaded.search(x[:1], 10)[0]]
    resaved = loaded.save(tmp_path / "idx")
    assert json.loads((resaved / "manifest.json").read_text())["factory"] == loaded.index.factory
    assert len(coll.Collection.load(tmp_path / "idx")) == len(x) - 1
