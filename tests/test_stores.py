"""One collection test-suite, run against both vector stores: FAISS (``Collection``) and Milvus
(``MilvusCollection`` on Milvus Lite in a temporary folder; skipped when pymilvus/milvus-lite are
not installed). Small random unit vectors, so that exact cosine top-k is the reference."""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import faiss_without_torch_patch

from fashsim.errors import FashsimError
from fashsim.search.collection import CorruptIndexError, IndexMismatchError
from fashsim.search.filters import (
    FilterError,
    conditions,
    milvus_expressible,
    parse_conditions,
    to_milvus_expression,
    to_predicate,
)
from fashsim.search.index import VectorIndexError
from fashsim.search.metadata import MetadataError, field_kinds
from fashsim.search.stores import FaissCollection, VectorStore, build_collection, open_collection

HAS_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
STORES = [
    "faiss",
    pytest.param("milvus", marks=pytest.mark.skipif(not HAS_MILVUS, reason="pip install 'fashsim[milvus]'")),
]
DIM, N, K = 16, 400, 10
CATEGORIES = ("Bag", "Coat", "Shirt", "Sneaker")
COLOURS = ("Red", "Blue", "Black")
_names = itertools.count()


def unit(rng, n, dim=DIM):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_records(ids):
    return [
        {
            "id": int(i),
            "source": f"img/{i}.png",
            "category": CATEGORIES[i % 4],
            "colour": COLOURS[i % 3],
            "price": float((i * 7) % 100),
        }
        for i in ids
    ]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ids = np.arange(100, 100 + N)
    return unit(rng, N), make_records(ids), ids, unit(rng, 20)


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory):
    """One Milvus Lite database and client for the whole module (start-up costs time); each test
    uses its own collection in it."""
    if not HAS_MILVUS:
        pytest.skip("pymilvus / milvus-lite not installed")
    from pymilvus import MilvusClient

    path = tmp_path_factory.mktemp("milvus") / "milvus.db"
    with faiss_without_torch_patch():
        client = MilvusClient(str(path))
        yield path, client
        client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(path))


@pytest.fixture
def store_kit(request, tmp_path):
    """``(store, build(vectors, records, **kw), reopen(collection, **kw))`` for the parametrized store."""
    store = request.param
    if store == "faiss":

        def build(vectors, records, **kw):
            return build_collection(vectors, records, store="faiss", **kw)

        def reopen(collection, **kw):
            target = tmp_path / f"faiss-{next(_names)}"
            collection.save(target)
            return open_collection(target, store="faiss", **kw)

        return store, build, reopen
    path, client = request.getfixturevalue("milvus_db")  # created only when a Milvus test asks for it

    def build(vectors, records, **kw):
        return build_collection(
            vectors, records, store="milvus", location=path, collection_name=f"t{next(_names)}", client=client, **kw
        )

    def reopen(collection, **kw):
        collection.save()
        return open_collection(path, store="milvus", collection_name=collection.name, client=client, **kw)

    return store, build, reopen


def exact_top(vectors, ids, queries, k, mask=None):
    sims = queries @ vectors.T
    if mask is not None:
        sims = np.where(mask[None, :], sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [[int(ids[j]) for j in row if np.isfinite(sims[r, j])] for r, row in enumerate(order)], sims


def recall(found, expected):
    return np.mean([len(set(f) & set(e)) / max(len(e), 1) for f, e in zip(found, expected)])


def hit_ids(results):
    return [[h.id for h in hits] for hits in results]


both_stores = pytest.mark.parametrize("store_kit", STORES, indirect=True)


# ---------------------------------------------------------------- build, search
@both_stores
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_search_equals_exact_cosine_top_k(store_kit, data, kind):
    store, build, _ = store_kit
    vectors, records, ids, queries = data
    collection = build(vectors, records, kind=kind, model_fingerprint="fp")
    assert isinstance(collection, VectorStore)
    assert len(collection) == N and collection.dim == DIM and collection.model_fingerprint == "fp"
    assert collection.categories() == {c: N // 4 for c in CATEGORIES}
    results = collection.search(queries, K)
    expected, sims = exact_top(vectors, ids, queries, K)
    if kind == "flat":
        assert hit_ids(results) == expected
    else:
        assert recall(hit_ids(results), expected) >= 0.95
    first = results[0][0]
    assert first.rank == 1 and np.isclose(first.score, sims[0].max(), atol=1e-4)
    assert first.category == records[first.id - 100]["category"] and first.source == f"img/{first.id}.png"
    assert first.extra == {"colour": records[first.id - 100]["colour"], "price": records[first.id - 100]["price"]}
    assert [h.rank for h in results[0]] == list(range(1, K + 1))
    # an item finds itself first
    assert collection.search(vectors[7], 1)[0][0].id == ids[7]


@both_stores
def test_category_filter_returns_only_that_category(store_kit, data):
    _, build, _ = store_kit
    vectors, records, ids, queries = data
    collection = build(vectors, records, kind="flat")
    mask = np.array([r["category"] == "Coat" for r in records])
    results = collection.search(queries, K, category="Coat")
    assert all(h.category == "Coat" for hits in results for h in hits)
    assert hit_ids(results) == exact_top(vectors, ids, queries, K, mask)[0]
    assert collection.search(queries[:2], K, category="Hat") == [[], []]


@both_stores
def test_metadata_filters(store_kit, data):
    store, build, _ = store_kit
    vectors, records, ids, queries = data
    collection = build(vectors, records, kind="flat")

    def matches(r):
        return r["colour"] == "Red" and r["price"] < 50

    mask = np.array([matches(r) for r in records])
    expected = exact_top(vectors, ids, queries, K, mask)[0]
    for where in ({"colour": "Red", "price": ("<", 50)}, matches):
        results = collection.search(queries, K, where=where)
        assert all(h.extra["colour"] == "Red" and h.extra["price"] < 50 for hits in results for h in hits)
        assert hit_ids(results) == expected
    both = collection.search(
        queries, K, category="Bag", where={"colour": ["Red", "Black"], "price": [(">=", 10), ("<", 60)]}
    )
    assert all(
        h.category == "Bag" and h.extra["colour"] in ("Red", "Black") and 10 <= h.extra["price"] < 60
        for hits in both
        for h in hits
    )
    assert sum(map(len, both)) > 0
    assert collection.search(queries[:1], K, where={"colour": "Green"}) == [[]]
    assert collection.search(queries[:1], K, where=lambda r: False) == [[]]
    # a CSV column whose name a Milvus expression cannot hold filters alike on both stores
    odd = [{**r, "Stock Level": ("low", "high")[r["id"] % 2]} for r in records]
    collection = build(vectors, odd, kind="flat")
    mask = np.array([r["Stock Level"] == "high" and r["colour"] == "Red" for r in odd])
    results = collection.search(queries, K, where={"Stock Level": "high", "colour": "Red"})
    assert hit_ids(results) == exact_top(vectors, ids, queries, K, mask)[0]
    assert collection.metadata.field_kinds() == {
        "id": "number",
        "source": "text",
        "category": "text",
        "Stock Level": "text",
        "colour": "text",
        "price": "number",
    }
    expression = 'extra["colour"] == "Red" and extra["price"] < 50'
    if store == "milvus":
        assert hit_ids(collection.search(queries, K, where=expression)) == expected
    else:
        with pytest.raises(FilterError, match="Milvus"):
            collection.search(queries, K, where=expression)


def test_a_k_beyond_the_collection_returns_every_item(data):
    vectors, records, ids, queries = data
    collection = build_collection(vectors, records, kind="flat")
    (hits,) = collection.search(queries[:1], 10**9)  # no queries × 10⁹ arrays: as deep as the collection
    assert [h.id for h in hits] == exact_top(vectors, ids, queries[:1], N)[0][0]


# ---------------------------------------------------------------- add, remove, upsert
@both_stores
def test_add_remove_upsert(store_kit, data):
    _, build, _ = store_kit
    vectors, records, ids, _ = data
    collection = build(vectors[:300], records[:300], kind="flat")
    collection.add(vectors[300:], records[300:])
    assert len(collection) == N
    assert collection.search(vectors[350], 1)[0][0].id == ids[350]
    with pytest.raises(MetadataError):
        collection.add(vectors[:2], records[:2])  # ids already there
    with pytest.raises(MetadataError):
        collection.add(vectors[:2], [dict(records[0], id=9000), dict(records[1], id=9000)])  # repeated id
    with pytest.raises(FashsimError):
        collection.add(vectors[:2], records[:1])
    # the same refusals on both stores: a broken embedding, a negative id (and a NaN query)
    broken = vectors[:1].copy()
    broken[0, 2] = np.inf
    with pytest.raises(VectorIndexError, match="NaN or infinite"):
        collection.add(broken, [dict(records[0], id=9001)])
    with pytest.raises(VectorIndexError, match="ids must be ≥ 0"):
        collection.add(vectors[:1], [dict(records[0], id=-5)])
    with pytest.raises(VectorIndexError, match="NaN or infinite"):
        collection.search(broken * np.nan, 3)
    assert len(collection) == N
    # fields as a pandas row holds them (numpy scalars) are kept as numbers; other objects refused
    row = dict(records[0], id=np.int64(9002), price=np.float32(12.5), stock=np.int64(3), sale=np.bool_(True))
    collection.add(vectors[:1], [row])
    assert collection.metadata.get([9002])[0] == dict(records[0], id=9002, price=12.5, stock=3, sale=True)
    assert 9002 in hit_ids(collection.search(vectors[0], 3, where={"stock": 3, "price": ("<", 13)}))[0]
    with pytest.raises(MetadataError, match="record 9003: extra fields must be JSON values .*set"):
        collection.add(vectors[:1], [dict(records[0], id=9003, sizes={"S", "M"})])
    assert collection.remove([9002]) == 1 and len(collection) == N

    assert collection.remove(ids[:5]) == 5
    assert len(collection) == N - 5
    assert collection.search(vectors[0], 1)[0][0].id != ids[0]
    assert collection.metadata.get([ids[0], ids[5]]) == [None, records[5]]
    with pytest.raises(VectorIndexError):
        collection.remove([ids[0]])  # already gone
    assert sum(collection.categories().values()) == N - 5

    # upsert: a new vector + record for an existing id, and a brand-new id
    rng = np.random.default_rng(5)
    new = unit(rng, 2)
    collection.upsert(new, [{"id": int(ids[10]), "source": "new.png", "category": "Hat"}, dict(records[0], price=1.0)])
    assert len(collection) == N - 4
    hit = collection.search(new[0], 1)[0][0]
    assert (hit.id, hit.category, hit.source, hit.extra) == (ids[10], "Hat", "new.png", {})
    assert np.isclose(hit.score, 1.0, atol=1e-4)
    assert collection.search(new[1], 1)[0][0].id == ids[0]
    assert collection.metadata.get([ids[0]])[0]["price"] == 1.0
    assert collection.categories()["Hat"] == 1
    assert np.array_equal(collection.metadata.ids("Hat"), [ids[10]])
    assert len(collection.index.ids()) == N - 4 and ids[10] in collection.index.ids()


# ---------------------------------------------------------------- persistence
@both_stores
def test_save_load_round_trip(store_kit, data):
    _, build, reopen = store_kit
    vectors, records, _, queries = data
    collection = build(vectors, records, kind="hnsw", model_fingerprint="abc", ef_search=64)
    before = collection.search(queries, K, category="Shirt")
    loaded = reopen(collection)
    assert loaded is not collection
    assert len(loaded) == N and loaded.dim == DIM and loaded.model_fingerprint == "abc"
    assert loaded.index.kind == "hnsw" and loaded.index.params["ef_search"] == 64
    after = loaded.search(queries, K, category="Shirt")
    assert hit_ids(after) == hit_ids(before)
    assert np.allclose([h.score for hits in after for h in hits], [h.score for hits in before for h in hits], atol=1e-5)
    assert loaded.categories() == collection.categories()


@both_stores
def test_model_fingerprint_is_checked_on_load(store_kit, data):
    import torch

    from fashsim.model.networks import EmbeddingNet
    from fashsim.model.persistence import fingerprint

    _, build, reopen = store_kit
    vectors, records, _, _ = data
    torch.manual_seed(0)
    model_a = EmbeddingNet("small_cnn", embedding_dim=DIM)
    model_b = EmbeddingNet("small_cnn", embedding_dim=DIM)
    assert fingerprint(model_a) != fingerprint(model_b)
    collection = build(vectors, records, kind="flat", model_fingerprint=fingerprint(model_a))
    assert reopen(collection, model=model_a).model_fingerprint == fingerprint(model_a)
    with pytest.raises(IndexMismatchError, match="built with model"):
        reopen(collection, model=model_b)
    with pytest.raises(IndexMismatchError, match="32-d"):
        reopen(collection, expected_dim=32)


@both_stores
def test_missing_collection_is_reported(store_kit, tmp_path):
    store, _, _ = store_kit
    with pytest.raises(CorruptIndexError, match="build it first"):
        open_collection(tmp_path / "nothing-here", store=store)


# ---------------------------------------------------------------- the searcher on top
@both_stores
def test_searcher_works_unchanged_on_top(store_kit):
    import torch

    from fashsim.model.inference import embed_arrays
    from fashsim.model.networks import EmbeddingNet
    from fashsim.model.persistence import fingerprint
    from fashsim.search.searcher import Searcher

    _, build, reopen = store_kit
    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn").eval()
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(40, 7, 7))
    images = np.kron(blocks, np.ones((4, 4))).astype(np.uint8)  # Fashion-MNIST-like 28x28 arrays, all different
    records = [{"id": 60000 + i, "source": f"fashion-mnist:test:{i}", "category": CATEGORIES[i % 4]} for i in range(40)]
    collection = build(embed_arrays(model, images), records, model_fingerprint=fingerprint(model))
    searcher = Searcher(model, reopen(collection, model=model))
    hits = searcher.search_prepared(images[7], k=5)  # a catalog image as stored finds itself
    assert hits[0].id == 60007 and np.isclose(hits[0].score, 1.0, atol=1e-4) and len(hits) == 5
    assert len(searcher.search(images[7], k=5)) == 5  # through decode + prepare
    assert {h.category for h in searcher.search(images[7], k=5, category="Coat")} == {"Coat"}
    assert searcher.categories() == list(CATEGORIES)
    searcher.search_prepared(images[8], k=3, log=True)
    assert searcher.collection.metadata.history()[0]["result_ids"][0] == 60008
    # what the demo's "random catalog item" button reads
    some_id = int(searcher.collection.index.ids()[3])
    assert searcher.collection.metadata.get([some_id])[0]["source"] == f"fashion-mnist:test:{some_id - 60000}"


@both_stores
def test_the_demo_app_searches_and_filters_on_either_store(store_kit):
    import torch

    from fashsim.app.demo import SearchApp, png_bytes
    from fashsim.model.inference import embed_arrays
    from fashsim.model.networks import EmbeddingNet
    from fashsim.model.persistence import fingerprint
    from fashsim.search.searcher import Searcher

    _, build, reopen = store_kit
    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn").eval()
    blocks = np.random.default_rng(4).integers(0, 256, size=(30, 7, 7))
    images = np.kron(blocks, np.ones((4, 4))).astype(np.uint8)
    records = [{"id": i, "source": f"fashion-mnist:test:{i}", "category": CATEGORIES[i % 4],
                "colour": "Red" if i % 2 else "Blue", "name": f"item {i}"} for i in range(30)]  # fmt: skip
    collection = build(embed_arrays(model, images), records, model_fingerprint=fingerprint(model))
    searcher = Searcher(model, reopen(collection, model=model))
    assert searcher.collection.metadata.field_values() == {"colour": ["Blue", "Red"]}  # names: too many to filter
    app = SearchApp(searcher, k=5)
    hits = app.search_bytes(png_bytes(images[3], size=28), name="query.png")
    assert not app.last_error and len(hits) == 5
    assert all(hit.extra["colour"] in ("Red", "Blue") and hit.extra["name"].startswith("item") for hit in hits)
    app.search_bytes(b"not an image", name="notes.jpg")
    assert "notes.jpg" in app.last_error


# ---------------------------------------------------------------- filters and the factory (store-independent)
def test_filter_forms():
    assert conditions({"colour": "Red", "price": ("<", 50), "size": ["S", "M"]}) == [
        ("colour", "==", "Red"),
        ("price", "<", 50),
        ("size", "in", ["S", "M"]),
    ]
    assert to_milvus_expression({"category": ["Bag", "Coat"], "colour": 'Re"d', "price": [(">=", 1), ("<", 2.5)]}) == (
        '(category in ["Bag", "Coat"]) and (extra["colour"] == "Re\\"d") and (extra["price"] >= 1) and '
        '(extra["price"] < 2.5)'
    )
    assert (
        to_milvus_expression({"size": ("not in", ["S"]), "sale": True})
        == '(extra["size"] != "S") and (extra["sale"] == true)'
    )
    predicate = to_predicate({"price": ("<", 50), "colour": ["Red"]})
    assert predicate({"price": 10, "colour": "Red"}) and not predicate({"price": 10, "colour": "Blue"})
    assert not predicate({"colour": "Red"}) and not predicate({"price": "cheap", "colour": "Red"})
    for bad in ({"price": ("~", 1)}, {"": 1}, {"price": ("in", [])}, {"price": [1, None]}, {"x": float("nan")}):
        with pytest.raises(FilterError):
            conditions(bad)
    assert milvus_expressible({"colour": 1, "category": 2}) and not milvus_expressible({"Base Colour": "Red"})
    with pytest.raises(FilterError, match="letters, digits"):
        to_milvus_expression({"Base Colour": "Red"})


def test_command_line_conditions_read_values_as_the_columns_hold_them():
    assert parse_conditions(["baseColour=Red", "price<50", "size=8"]) == {
        "baseColour": [("==", "Red")],
        "price": [("<", 50)],
        "size": [("==", 8)],
    }
    kinds = field_kinds([{"price": 12.5, "size": "8", "sku": "0001", "Base Colour": "Red", "misc": 3}, {"misc": "x"}])
    assert kinds == {
        "id": "number",
        "source": "text",
        "category": "text",
        "Base Colour": "text",
        "misc": "mixed",
        "price": "number",
        "size": "text",
        "sku": "text",
    }
    where = parse_conditions(["size=8", "sku=0001", "price<50", "Base Colour=Red", "misc=3"], kinds)
    assert where == {
        "size": [("==", "8")],
        "sku": [("==", "0001")],
        "price": [("<", 50)],
        "Base Colour": [("==", "Red")],
        "misc": [("==", 3)],
    }
    record = {"size": "8", "sku": "0001", "price": 12.5, "Base Colour": "Red", "misc": 3}
    assert to_predicate(where)(record)
    quoted = parse_conditions(["Base Colour='Red'", 'sku="0001"', 'price<"50"'], kinds)  # quotes as a shell keeps them
    assert quoted == {"Base Colour": [("==", "Red")], "sku": [("==", "0001")], "price": [("<", 50)]}
    for text, message in (
        ("colour=Red", "no column 'colour'; the columns are: id, source, category, Base Colour"),
        ("size<10", "size holds text"),
        ("price=cheap", "price holds numbers"),
        ("price<cheap", "'cheap' is not one"),
        ("misc<x", "< needs a number"),
    ):
        with pytest.raises(FilterError, match=re.escape(message)):
            parse_conditions([text], kinds)
    with pytest.raises(FashsimError, match="unknown vector store"):
        open_collection("x", store="annoy")


def test_faiss_store_is_the_default_and_a_collection(data, tmp_path, monkeypatch):
    vectors, records, _, _ = data
    monkeypatch.delenv("FASHSIM_STORE", raising=False)
    collection = build_collection(vectors, records, location=tmp_path / "idx", kind="flat")
    assert isinstance(collection, FaissCollection)
    assert isinstance(open_collection(tmp_path / "idx"), FaissCollection)
    monkeypatch.setenv("FASHSIM_STORE", "annoy")
    with pytest.raises(FashsimError, match="unknown vector store"):
        open_collection(tmp_path / "idx")


def test_missing_pymilvus_says_what_to_install(monkeypatch, tmp_path):
    from fashsim.search.milvus import MilvusCollection, MilvusNotInstalledError

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus -> ImportError
    with pytest.raises(MilvusNotInstalledError, match=r"\.\[milvus\]"):
        MilvusCollection(DIM, "flat", location=tmp_path / "m.db")


@pytest.mark.skipif(not HAS_MILVUS, reason="pip install 'fashsim[milvus]'")
def test_a_lite_database_in_use_elsewhere_is_one_line_of_error(milvus_db):
    """This process holds the module's Lite database; another one opening it gets fashsim's error
    with Milvus Lite's reason, and no traceback of Milvus Lite's own on the way."""
    path, _ = milvus_db
    script = (
        "import sys\nfrom fashsim.errors import FashsimError\nfrom fashsim.search.stores import open_collection\n"
        f"try:\n    open_collection({str(path)!r}, store='milvus')\n"
        "except FashsimError as exc:\n    sys.exit(f'error: {exc}')\n"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert other.returncode == 1
    assert other.stderr.count("\n") == 1, other.stderr
    assert "another process holds the lock" in other.stderr and "one process at a time" in other.stderr


@pytest.mark.skipif(not HAS_MILVUS, reason="pip install 'fashsim[milvus]'")
def test_milvus_specifics(data, milvus_db, tmp_path):
    """Temporary database, copy to another location, replace-on-build, Lite's missing PQ."""
    from fashsim.search.milvus import MilvusCollection

    vectors, records, ids, queries = data
    path, client = milvus_db
    temporary = MilvusCollection.build(vectors[:50], records[:50], model_fingerprint="tmp")
    where = temporary.location
    copied = temporary.save(tmp_path / "copy")  # a directory: holds milvus.db
    temporary.close()
    assert not Path(where).exists()  # the temporary database is gone, the copy stays
    reopened = MilvusCollection.load(copied)
    assert len(reopened) == 50 and reopened.model_fingerprint == "tmp"
    assert reopened.search(vectors[3], 1)[0][0].id == ids[3]
    reopened.close()

    first = build_collection(vectors, records, store="milvus", location=path, collection_name="same", client=client)
    # what a build killed half-way leaves: a staging collection, dropped by the next build
    MilvusCollection(DIM, "flat", location=path, collection_name="same_staging_1795867071567974577", client=client)
    second = build_collection(
        vectors[:10], records[:10], store="milvus", location=path, collection_name="same", client=client
    )
    assert len(second) == 10 and second.name == "same"
    assert [c for c in client.list_collections() if c.startswith("same")] == ["same"]
    del first
    with pytest.raises(FashsimError, match="already holds"):
        MilvusCollection(DIM, "flat", location=path, collection_name="same", client=client)
    with pytest.raises(FashsimError, match="product-quantisation"):
        MilvusCollection(DIM, "ivfpq", location=path, collection_name="pq", client=client)
    assert np.allclose(second.index.reconstruct(ids[:3]), vectors[:3], atol=1e-6)
    with pytest.raises(CorruptIndexError, match="build it first"):
        open_collection(path, store="milvus", collection_name="nope", client=client)
    second.drop()  # gone for good: the name is free again
    assert "same" not in client.list_collections()
    with pytest.raises(CorruptIndexError, match="build it first"):
        open_collection(path, store="milvus", collection_name="same", client=client)
