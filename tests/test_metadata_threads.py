"""The metadata store (and so Collection.search) used from threads other than the one that made it.

ipykernel 7 runs widget callbacks on a subshell thread; a plain ``sqlite3.connect(":memory:")``
made on the main thread then raises ``ProgrammingError: SQLite objects created in a thread can
only be used in that same thread`` at the first search from a button click.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import run_until_finished

from fashsim.search.collection import Collection
from fashsim.search.metadata import MetadataStore

CATEGORIES = ("Dress", "Bag", "Sneaker", "Coat")


def _collection(n=3000, dim=32, seed=0) -> tuple[Collection, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [
        {"id": i, "source": f"img/{i}.png", "category": CATEGORIES[i % 4], "colour": ("red", "blue")[i % 2]}
        for i in range(n)
    ]
    return Collection.build(vectors, records, kind="flat"), vectors


def test_store_made_on_one_thread_is_usable_from_another(tmp_path):
    store = MetadataStore()
    store.add([{"id": 1, "source": "a.png", "category": "Dress", "colour": "red"}])
    store.save(tmp_path / "c.sqlite")
    loaded = MetadataStore.load(tmp_path / "c.sqlite")
    out = {}

    def work():
        out["get"] = loaded.get([1])
        loaded.log_search(5, None, [1])
        out["history"] = loaded.history()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert out["get"] == [{"id": 1, "source": "a.png", "category": "Dress", "colour": "red"}]
    assert out["history"][0]["result_ids"] == [1]
    assert len(loaded) == 1 and loaded.categories() == {"Dress": 1}  # and still from this thread


def test_concurrent_searches_from_many_threads_match_serial_results():
    collection, vectors = _collection()
    queries = vectors[:64] + 0.01
    expected = [collection.search(q[None], k=7, category=CATEGORIES[i % 4])[0] for i, q in enumerate(queries)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(thread_no: int):
        start.wait()  # all threads hit the store at the same moment
        results = []
        for i in range(thread_no, len(queries), 8):
            try:
                hits = collection.search(queries[i][None], k=7, category=CATEGORIES[i % 4], log=True)[0]
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)
                continue
            results.append((i, hits))
        return results

    with ThreadPoolExecutor(8) as pool:
        outcomes = [r for rs in pool.map(worker, range(8)) for r in rs]
    assert not errors, errors[:3]
    assert len(outcomes) == len(queries)
    for i, hits in outcomes:
        assert [h.id for h in hits] == [h.id for h in expected[i]]
        assert all(h.category == CATEGORIES[i % 4] and h.extra["colour"] in ("red", "blue") for h in hits)
    history = collection.metadata.history(limit=1000)
    assert len(history) == len(queries) and all(len(h["result_ids"]) == 7 for h in history)


def test_reads_and_writes_interleaved_across_threads_stay_consistent():
    store = MetadataStore()
    store.add([{"id": i, "source": f"{i}.png", "category": "Bag"} for i in range(1000)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(next_id: int):
        while not stop.is_set():
            try:
                store.add([{"id": next_id + j, "source": "x.png", "category": "Coat"} for j in range(20)])
                assert store.remove(np.arange(next_id, next_id + 20)) == 20
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            next_id += 20

    def reader():
        for _ in range(200):
            try:
                records = store.get(np.arange(0, 1000, 7))
                assert all(r is not None and r["category"] == "Bag" for r in records)
                counts = store.categories()
                assert counts["Bag"] == 1000 and counts.get("Coat", 0) in (0, 20, 40)  # two writers
                assert len(store.ids("Bag")) == 1000
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    writers = [threading.Thread(target=writer, args=(start,)) for start in (10_000, 1_000_000)]
    readers = [threading.Thread(target=reader) for _ in range(4)]
    run_until_finished(readers, writers, stop)
    assert not errors, errors[:3]
    assert len(store) == 1000


@pytest.mark.parametrize("method", ["save", "history"])
def test_save_and_history_from_a_worker_thread(tmp_path, method):
    collection, _ = _collection(n=200)
    collection.search(np.ones((1, 32), np.float32), k=3, log=True)
    box = {}
    target = tmp_path / "copy.sqlite"
    call = (
        (lambda: collection.metadata.save(target))
        if method == "save"
        else (lambda: box.setdefault("h", collection.metadata.history()))
    )
    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    if method == "save":
        assert len(MetadataStore.load(target)) == 200
    else:
        assert len(box["h"]) == 1
