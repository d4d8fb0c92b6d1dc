"""Vector-store benchmark: FAISS (fashsim's Collection) vs Milvus Lite (MilvusCollection), through the
same interface (:mod:`fashsim.search.stores`), on the same synthetic collection.

100 000 × 128 clustered unit vectors, each with a category (10 categories, 10 % each, unrelated to
the clusters, so that a category filter keeps items spread over the whole space). Both stores use
HNSW (M=32, efConstruction=200, ef=128) with the cosine / inner-product metric. Measured:

* build time (items in, index built, persisted: FAISS in memory, Milvus Lite in a .db in a
  temporary folder), and the first query (Milvus Lite builds segment indexes lazily);
* single-query latency p50/p95 (one query per call, top-10, records returned with the hits);
* batched throughput (all queries in one call);
* recall@10 against exact search (numpy);
* category-filtered search: latency p50/p95, recall@10 against exact filtered search, and
  correctness: share of hits outside the category (must be 0) and of queries with 10 hits.

    .venv/bin/python benchmarks/bench_stores.py [--n 100000] [--queries 1000] [--latency-queries 300]

Writes ``reports/benchmarks/stores.json``. Needs ``pip install -e '.[milvus]'`` for the Milvus part
(without it only FAISS is measured).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_search import synthetic as clustered_vectors  # the same data model as bench_search.py

CATEGORIES = [f"c{i}" for i in range(10)]
HNSW = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128}


def synthetic(n: int, n_queries: int, seed: int = 0):
    """The search benchmark's clustered unit vectors, each item and query with a random category."""
    base, queries = clustered_vectors(n, n_queries, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return base, rng.integers(0, len(CATEGORIES), n), queries, rng.integers(0, len(CATEGORIES), n_queries)


def exact(base: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k ids (row numbers) by inner product, in chunks; ``mask``: per-query allowed rows."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 256):
        sims = queries[start : start + 256] @ base.T
        if mask is not None:
            sims = np.where(mask[start : start + 256], sims, -np.inf)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(-sims, top, 1).argsort(1, kind="stable")
        out[start : start + 256] = np.take_along_axis(top, order, 1)
    return out


def recall_at_k(found: list[list[int]], expected: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e.tolist())) / len(e) for f, e in zip(found, expected)]))


def percentiles(times_ms: list[float]) -> dict:
    return {"p50": round(float(np.percentile(times_ms, 50)), 3), "p95": round(float(np.percentile(times_ms, 95)), 3)}


def run_store(store: str, base, categories, queries, query_categories, args, workdir: Path) -> dict:
    import faiss

    from fashsim.search.stores import build_collection

    k = 10
    records = [
        {"id": i, "source": f"synthetic:{i}", "category": CATEGORIES[c], "price": float(i % 100)}
        for i, c in enumerate(categories)
    ]
    location = workdir / f"{store}-index"
    threads = faiss.omp_get_max_threads()
    start = time.perf_counter()
    collection = build_collection(base, records, store=store, kind="hnsw", location=location, **HNSW)
    if store == "milvus":
        collection.save()  # flush (FAISS wrote its files in build_collection)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    collection.search(queries[:1], k)
    first_query_s = time.perf_counter() - start
    print(f"[{store}] built {len(collection)} items in {build_s:.1f} s (first query {first_query_s:.2f} s)", flush=True)

    # single queries, one thread for FAISS (both stores: Milvus Lite runs FAISS in this process too)
    faiss.omp_set_num_threads(1)
    n_lat = min(args.latency_queries, len(queries))
    for i in range(10):
        collection.search(queries[i : i + 1], k)
    times, found = [], []
    for i in range(n_lat):
        t = time.perf_counter()
        hits = collection.search(queries[i : i + 1], k)[0]
        times.append((time.perf_counter() - t) * 1000)
        found.append([h.id for h in hits])
    single = percentiles(times)

    filtered_times, filtered_found, outside, complete = [], [], 0, 0
    for i in range(n_lat):
        category = CATEGORIES[query_categories[i]]
        t = time.perf_counter()
        hits = collection.search(queries[i : i + 1], k, category=category)[0]
        filtered_times.append((time.perf_counter() - t) * 1000)
        filtered_found.append([h.id for h in hits])
        outside += sum(h.category != category for h in hits)
        complete += len(hits) == k
    faiss.omp_set_num_threads(threads)

    # batched: all queries in one call, all threads
    collection.search(queries[:50], k)
    t = time.perf_counter()
    batch = collection.search(queries, k)
    batch_s = time.perf_counter() - t
    batch_found = [[h.id for h in hits] for hits in batch]

    expected = exact(base, queries, k)
    mask = categories[None, :] == query_categories[:n_lat, None]
    expected_filtered = exact(base, queries[:n_lat], k, mask)
    result = {
        "store": store,
        "kind": "hnsw",
        "params": HNSW,
        "n_items": len(collection),
        "build_s": round(build_s, 2),
        "first_query_s": round(first_query_s, 3),
        "single_query_ms": single,
        "batched_qps": round(len(queries) / batch_s, 1),
        "batch_size": len(queries),
        "recall@10": round(recall_at_k(batch_found, expected), 4),
        "recall@10_single": round(recall_at_k(found, expected[:n_lat]), 4),
        "filtered": {
            "filter": "category == one of 10 categories (10 % of items), chosen at random per query",
            "latency_ms": percentiles(filtered_times),
            "recall@10": round(recall_at_k(filtered_found, expected_filtered), 4),
            "hits_outside_category": int(outside),
            "share_with_10_hits": round(complete / n_lat, 4),
        },
    }
    print(f"[{store}] {json.dumps(result)}", flush=True)
    if hasattr(collection, "close"):
        collection.close()
    return result


def versions() -> dict:
    out = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for package in ("faiss-cpu", "faiss-gpu", "pymilvus", "milvus-lite", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    from fashsim.fileio import atomic_write_bytes
    from fashsim.paths import reports_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="collection size (default 100k)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall and the batched run")
    parser.add_argument("--latency-queries", type=int, default=300, help="queries timed one by one")
    parser.add_argument("--stores", nargs="+", default=["faiss", "milvus"], choices=["faiss", "milvus"])
    parser.add_argument("--output", default=str(reports_dir() / "benchmarks" / "stores.json"))
    args = parser.parse_args(argv)

    stores = list(args.stores)
    if "milvus" in stores and importlib.util.find_spec("pymilvus") is None:
        print("pymilvus is not installed (pip install -e '.[milvus]'): measuring FAISS only", flush=True)
        stores.remove("milvus")
    base, categories, queries, query_categories = synthetic(args.n, args.queries)
    report = {
        "setup": {
            "n_items": args.n,
            "dim": base.shape[1],
            "n_queries": args.queries,
            "latency_queries": args.latency_queries,
            "data": "1000 Gaussian clusters, noise 0.6, L2-normalised; 10 random categories",
            "note": "shared machine (other work running on the same CPUs): timings are indicative",
            **versions(),
        },
        "stores": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
        for store in stores:
            report["stores"].append(run_store(store, base, categories, queries, query_categories, args, Path(tmp)))
    output = atomic_write_bytes(args.output, json.dumps(report, indent=2).encode())
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
