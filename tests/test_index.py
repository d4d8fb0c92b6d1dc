"""Vector index + catalog + persistence, on small generated embeddings."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import run_until_finished

from fashsim.evaluation.metrics import knn
from fashsim.fileio import sha256_file
from fashsim.search import collection as coll
from fashsim.search.index import VectorIndex, VectorIndexError, choose_kind
from fashsim.search.metadata import MetadataError, MetadataStore

KINDS = ["flat", "hnsw", "ivfpq"]
PARAMS = {"flat": {}, "hnsw": {}, "ivfpq": {"pq_m": 16, "nprobe": 64}}


def clustered(n=4000, dim=32, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + 0.35 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def records(labels, start=1000):
    return [
        {"id": start + i, "source": f"img/{i}.png", "category": f"c{label % 4}", "colour": ["red", "blue"][i % 2]}
        for i, label in enumerate(labels)
    ]


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """Tiny indexes: on a shared machine FAISS's OpenMP threads wait on each other longer than the work takes."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def build(kind, data):
    x, labels = data
    return coll.Collection.build(x, records(labels), kind=kind, **PARAMS[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_search_agrees_with_exact_knn(kind, data):
    x, _ = data
    c = build(kind, data)
    assert len(c) == len(x) and c.index.kind == kind
    _, exact = knn(x[:200], x, 10)
    hits = c.search(x[:200], 10)
    recall = np.mean([len({h.id - 1000 for h in row} & set(e)) / 10 for row, e in zip(hits, exact)])
    assert recall >= {"flat": 1.0, "hnsw": 0.95, "ivfpq": 0.75}[kind]  # PQ is lossy by design
    assert [h.rank for h in hits[0]] == list(range(1, 11))
    assert all(a.score >= b.score for a, b in zip(hits[0], hits[0][1:]))


@pytest.mark.parametrize("kind", KINDS)
def test_category_filter_returns_k_of_that_category(kind, data):
    c = build(kind, data)
    x, _ = data
    for category, _count in c.categories().items():
        hits = c.search(x[:5], 25, category=category)
        assert all(len(row) == 25 for row in hits)
        assert all(h.category == category for row in hits for h in row)
    tiny = c.search(x[:1], 10, where=lambda r: r["id"] in (1003, 1004, 1005))[0]
    assert sorted(h.id for h in tiny) == [1003, 1004, 1005]  # fewer exist than k: all of them
    red = c.search(x[:3], 10, category="c1", where=lambda r: r["colour"] == "red")
    assert all(h.category == "c1" and h.extra["colour"] == "red" for row in red for h in row)


@pytest.mark.parametrize("kind", KINDS)
def test_add_and_remove_without_rebuild(kind, data):
    c = build(kind, data)
    x, _ = data
    query = x[7:8]
    first = c.search(query, 1)[0][0]
    assert first.id == 1007
    assert c.remove([1007]) == 1
    assert 1007 not in [h.id for h in c.search(query, 50)[0]]
    assert len(c) == len(x) - 1
    with pytest.raises(VectorIndexError, match="not in the index"):
        c.index.remove([1007])
    new = np.roll(query, 1, axis=1)
    new /= np.linalg.norm(new)
    c.add(new, [{"id": 99999, "source": "new.png", "category": "new"}])
    assert c.search(new, 1)[0][0].id == 99999
    assert c.categories()["new"] == 1
    c.add(query, [{"id": 1007, "source": "back.png", "category": "c0"}])  # re-adding a removed id
    assert c.search(query, 1)[0][0].source == "back.png"


def test_duplicate_ids_are_refused_and_nothing_half_added(data):
    c = build("flat", data)
    x, _ = data
    before = len(c)
    with pytest.raises(MetadataError, match="already exist"):
        c.add(x[:2], [{"id": 5, "source": "a", "category": "z"}, {"id": 1000, "source": "b", "category": "z"}])
    assert len(c) == before and len(c.metadata) == before
    with pytest.raises(VectorIndexError, match="already in the index"):
        c.index.add(x[:1], [1000])
    with pytest.raises(VectorIndexError, match="dimension"):
        c.add(np.zeros((1, 7), np.float32), [{"id": 1, "source": "a", "category": "z"}])
    assert len(c) == before and len(c.metadata) == before  # the catalog insert was rolled back
    c.index.upsert(x[:1] * -1, [1000])
    assert c.search(-x[:1], 1)[0][0].id == 1000


def test_broken_vectors_and_negative_ids_are_refused_and_scale_does_not_matter(data):
    c = build("flat", data)
    x, _ = data
    before = len(c)
    for bad, message in ((np.full((1, 32), np.inf, np.float32), "NaN or infinite"), (np.zeros((1, 32)), "all zeros")):
        with pytest.raises(VectorIndexError, match=message):
            c.add(bad, [{"id": 1, "source": "bad", "category": "z"}])
        with pytest.raises(VectorIndexError, match=message):
            c.search(bad, 3)
    query = x[:1].copy()
    query[0, 3] = np.nan
    with pytest.raises(VectorIndexError, match=r"1 of 1 vectors hold NaN"):
        c.search(query, 3)
    with pytest.raises(VectorIndexError, match="ids must be ≥ 0"):
        c.add(x[7:8], [{"id": -5, "source": "neg", "category": "z"}])
    assert len(c) == before and len(c.metadata) == before  # nothing half-added
    # an embedding scaled by 100 is the same direction: it is stored as a unit vector (cosine)
    c.add(100 * x[7:8], [{"id": 7, "source": "loud", "category": "z"}])
    hits = c.search(x[7:8], 2)[0]
    assert {h.id for h in hits} == {7, 1007} and max(h.score for h in hits) <= 1.0 + 1e-5


def test_auto_kind_thresholds():
    assert choose_kind(70_000) == "flat"
    assert choose_kind(1_000_000) == "hnsw"
    assert choose_kind(10_000_000) == "ivfsq"


def test_gpu_flag_without_gpu_is_a_clear_error():
    from fashsim.search.index import gpu_count

    if gpu_count():
        pytest.skip("a GPU is present")
    with pytest.raises(VectorIndexError, match="no GPU"):
        VectorIndex(16, "flat", use_gpu=True)
    assert VectorIndex(16, "flat", use_gpu="auto").device == "cpu"


def test_near_duplicates(data):
    x, labels = data
    x = x.copy()
    x[10] = x[11]  # an exact duplicate
    x[20] = x[21] * 0.999 + 0.001 * x[22]
    x[20] /= np.linalg.norm(x[20])
    c = coll.Collection.build(x, records(labels))
    groups = c.near_duplicates(0.995)
    assert [1010, 1011] in groups and [1020, 1021] in groups
    assert all(len(g) >= 2 for g in groups)
    pairs = c.near_duplicate_pairs(0.995)
    assert pairs[0][:2] == (1010, 1011) and pairs[0][2] == pytest.approx(1.0, abs=1e-5)  # the exact copy first
    assert (1020, 1021) in [p[:2] for p in pairs]
    assert all(a < b for a, b, _ in pairs) and [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)


def test_search_history(data):
    c = build("flat", data)
    x, _ = data
    c.search(x[:1], 3, category="c2", log=True)
    entry = c.metadata.history()[0]
    assert entry["k"] == 3 and entry["category"] == "c2" and len(entry["result_ids"]) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_identical_results(kind, data, tmp_path):
    c = build(kind, data)
    x, _ = data
    c.remove([1001, 1002])
    c.model_fingerprint = "abc123"
    c.save(tmp_path / "idx")
    loaded = coll.Collection.load(tmp_path / "idx")
    assert len(loaded) == len(c) and loaded.index.kind == kind
    for a, b in zip(c.search(x[:20], 10), loaded.search(x[:20], 10)):
        assert [h.id for h in a] == [h.id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b])
    assert loaded.categories() == c.categories()


def test_load_refuses_mismatched_model_and_corruption(data, tmp_path):
    from fashsim.model.networks import EmbeddingNet
    from fashsim.model.persistence import fingerprint

    model = EmbeddingNet("small_cnn", embedding_dim=32)
    c = build("flat", data)
    c.model_fingerprint = fingerprint(model)
    version = c.save(tmp_path / "idx")
    assert coll.Collection.load(tmp_path / "idx", model=model).model_fingerprint == fingerprint(model)
    other = EmbeddingNet("small_cnn", embedding_dim=32)
    with pytest.raises(coll.IndexMismatchError, match="rebuild the index"):
        coll.Collection.load(tmp_path / "idx", model=other)
    with pytest.raises(coll.IndexMismatchError, match="32-d vectors"):
        coll.Collection.load(tmp_path / "idx", expected_dim=128)
    vectors = version / "vectors.faiss"
    vectors.write_bytes(vectors.read_bytes()[: vectors.stat().st_size // 2])  # truncated
    with pytest.raises(coll.CorruptIndexError, match="truncated or corrupted"):
        coll.Collection.load(tmp_path / "idx")
    with pytest.raises(coll.CorruptIndexError, match="build it first"):
        coll.Collection.load(tmp_path / "empty")
    for damaged in ('{"format_version": 1}', "[]", "null", '{"sha256": 3, "model_fingerprint": null}'):
        (version / "manifest.json").write_text(damaged)  # valid JSON, edited by hand: no traceback either
        with pytest.raises(coll.CorruptIndexError, match="the manifest is damaged"):
            coll.Collection.load(tmp_path / "idx")


def test_corrupt_faiss_bytes_with_matching_checksum_are_refused(data, tmp_path):
    c = build("flat", data)
    version = c.save(tmp_path / "idx")
    garbage = b"\x00" * 1000
    (version / "vectors.faiss").write_bytes(garbage)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["sha256"]["vectors.faiss"] = sha256_file(version / "vectors.faiss")
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VectorIndexError, match="corrupt"):
        coll.Collection.load(tmp_path / "idx")


SAVER = textwrap.dedent("""
    import sys, numpy as np
    from fashsim.search.collection import Collection
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200000, 64)).astype(np.float32)
    c = Collection.build(x, [{"id": i, "source": "s", "category": "c"} for i in range(len(x))], kind="flat")
    print("ready", flush=True)
    while True:
        c.save(sys.argv[1])
""")


def test_kill_minus_9_mid_save_leaves_previous_version_loadable(data, tmp_path):
    target = tmp_path / "idx"
    c = build("flat", data)
    c.save(target)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # saves of ~50 MB are under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loaded = coll.Collection.load(target)  # whatever version CURRENT names is complete
    assert len(loaded) in (len(c), 200000)
    x, _ = data
    if len(loaded) == len(c):
        assert loaded.search(x[:1], 1)[0][0].id == 1000


def test_loads_during_saves_and_two_savers_never_fail(data, tmp_path):
    """A reader (the demo's kernels, `fashsim search`) loading while another process saves a new
    version, and two savers at once: every load gets a complete version, no save breaks another."""
    import threading

    target = tmp_path / "busy"
    c = build("flat", data)
    c.save(target)
    errors, loads = [], []

    def save_repeatedly():
        try:
            for _ in range(25):
                c.save(target)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))

    def load_repeatedly(stop):
        while not stop.is_set():
            try:
                loads.append(len(coll.Collection.load(target)))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(repr(exc))

    stop = threading.Event()
    savers = [threading.Thread(target=save_repeatedly) for _ in range(2)]
    readers = [threading.Thread(target=load_repeatedly, args=(stop,)) for _ in range(2)]
    run_until_finished(savers, readers, stop)
    assert errors == [] and loads and set(loads) == {len(c)}
    versions = sorted(p.name for p in target.iterdir() if p.is_dir())
    assert len(versions) == 2 and (target / "CURRENT").read_text() in versions  # the current one and the one before


def test_catalog_db_round_trip(tmp_path):
    db = MetadataStore()
    db.add(
        [{"id": 1, "source": "a.png", "category": "dress", "price": 9.5}, {"id": 2, "source": "b", "category": "bag"}]
    )
    assert db.get([2, 1, 3]) == [
        {"id": 2, "source": "b", "category": "bag"},
        {"id": 1, "source": "a.png", "category": "dress", "price": 9.5},
        None,
    ]
    with pytest.raises(MetadataError, match="lacks source"):
        db.add([{"id": 3, "category": "x"}])
    db.save(tmp_path / "c.sqlite")
    again = MetadataStore.load(tmp_path / "c.sqlite")
    assert again.categories() == {"bag": 1, "dress": 1}
    (tmp_path / "bad.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(MetadataError, match="not a readable"):
        MetadataStore.load(tmp_path / "bad.sqlite")


def test_compare_kinds_measures_recall_against_exact(data):
    from fashsim.evaluation.index_benchmark import compare_kinds

    x, _ = data
    rows = compare_kinds(
        x,
        x[:100],
        [
            ("hnsw", {"hnsw_m": 16}, [{"ef_search": 8}, {"ef_search": 128}]),
            ("ivfpq", {"pq_m": 16}, [{"nprobe": 1}, {"nprobe": 64}]),
        ],
        k=10,
    )
    assert [r["kind"] for r in rows] == ["flat", "hnsw", "hnsw", "ivfpq", "ivfpq"]
    assert rows[0]["recall@10"] == 1.0
    assert rows[2]["recall@10"] >= rows[1]["recall@10"] and rows[2]["recall@10"] > 0.95  # more effort, more recall
    assert rows[4]["recall@10"] > rows[3]["recall@10"]
    assert rows[3]["memory_mb"] < rows[0]["memory_mb"]  # PQ codes are smaller than floats
