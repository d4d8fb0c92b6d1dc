"""Choose a vector store: FAISS (the default, :class:`~fashsim.search.collection.Collection`) or
Milvus (:class:`~fashsim.search.milvus.MilvusCollection`), behind one interface.

    from fashsim.search.stores import build_collection, open_collection

    collection = build_collection(embeddings, records, store="milvus", location="data/index/fashion-mnist",
                                  model_fingerprint=fingerprint(model))
    collection = open_collection("data/index/fashion-mnist", store="milvus", model=model)
    Searcher(model, collection)          # the searcher does not care which store it is

``store`` is ``"faiss"`` or ``"milvus"``; left out, the ``FASHSIM_STORE`` environment variable
decides (default ``faiss``) — what a ``--store`` option or a config value should pass on.
``location``: for FAISS the collection's directory; for Milvus a Milvus Lite database (a ``.db``
path, or a directory that then holds ``milvus.db``) or a server URI ``http://host:19530[#name]``.

Both stores take ``where`` filters as a dict (``{"colour": "Red", "price": ("<", 50)}``) or a
callable; Milvus also takes a filter expression string (:mod:`fashsim.search.filters`). Both have
``upsert``: the FAISS collection returned here is a :class:`FaissCollection`, a ``Collection``
that adds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import FashsimError
from .collection import Collection, Hit

STORES = ("faiss", "milvus")
STORE_ENV = "FASHSIM_STORE"


@runtime_checkable
class VectorStore(Protocol):
    """What the searcher, the CLI, the demo and the evaluation use of a collection."""

    model_fingerprint: str | None
    metadata: object  # get(ids), ids(category=None), categories(), history()
    index: object  # kind, ids(), reconstruct(ids)

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def add(self, embeddings: np.ndarray, records: Sequence[Mapping]) -> None: ...

    def upsert(self, embeddings: np.ndarray, records: Sequence[Mapping]) -> None: ...

    def remove(self, ids) -> int: ...

    def categories(self) -> dict[str, int]: ...

    def search(
        self, queries: np.ndarray, k: int = 10, *, category: str | None = None, where=None, log: bool = False
    ) -> list[list[Hit]]: ...

    def save(self, location): ...


class FaissCollection(Collection):
    """:class:`Collection` (FAISS + SQLite) with ``upsert``, so that it offers the same interface
    as the Milvus collection."""

    def upsert(self, embeddings: np.ndarray, records: Sequence[Mapping]) -> None:
        """Add items, replacing the vector and record of ids that are already present (the old
        items are put back if the new ones cannot be added)."""
        if len(records) != len(embeddings):
            raise FashsimError(f"{len(embeddings)} embeddings but {len(records)} records")
        ids = np.asarray([int(r["id"]) for r in records if "id" in r], dtype=np.int64)
        present = self.metadata.existing(ids)
        old_records = self.metadata.get(present)
        old_vectors = self.index.reconstruct(present)
        if len(present):
            self.remove(present)
        try:
            self.add(embeddings, records)
        except Exception:
            if len(present):
                self.add(old_vectors, old_records)
            raise


def default_store() -> str:
    """``FASHSIM_STORE`` or ``faiss``."""
    return os.environ.get(STORE_ENV, "faiss").strip().lower() or "faiss"


def _check_store(store: str | None) -> str:
    store = (store or default_store()).lower()
    if store not in STORES:
        raise FashsimError(f"unknown vector store {store!r}: choose one of {', '.join(STORES)}")
    return store


def build_collection(
    embeddings: np.ndarray,
    records: Sequence[Mapping],
    *,
    store: str | None = None,
    location=None,
    model_fingerprint: str | None = None,
    kind: str = "auto",
    **options,
):
    """A new collection over ``embeddings`` in the chosen store. With ``location`` it is saved there
    (FAISS: a new version of the directory; Milvus: built in place, replacing an older collection
    only when complete); without, FAISS keeps it in memory and Milvus in a temporary Lite database
    (``save(location)`` later). ``options``: index parameters (``hnsw_m``, ``ef_search``...) and,
    for Milvus, ``collection_name``, ``metric``, ``token``, ``client``."""
    store = _check_store(store)
    if store == "faiss":
        collection = FaissCollection.build(
            embeddings, records, kind=kind, model_fingerprint=model_fingerprint, **options
        )
        if location is not None:
            collection.save(location)
        return collection
    from .milvus import MilvusCollection

    return MilvusCollection.build(
        embeddings, records, kind=kind, model_fingerprint=model_fingerprint, location=location, **options
    )


def open_collection(location, *, store: str | None = None, model=None, expected_dim: int | None = None, **options):
    """Load a saved collection from the chosen store. With ``model`` (an EmbeddingNet), a collection
    built by another model raises :class:`~fashsim.search.collection.IndexMismatchError`; a missing
    one raises :class:`~fashsim.search.collection.CorruptIndexError` (both stores). ``options``:
    FAISS ``use_gpu``; Milvus ``collection_name``, ``token``, ``client``."""
    store = _check_store(store)
    if store == "faiss":
        return FaissCollection.load(location, model=model, expected_dim=expected_dim, **options)
    from .milvus import MilvusCollection

    return MilvusCollection.load(location, model=model, expected_dim=expected_dim, **options)


def open_searcher(model_path, location, *, store: str | None = None, **kwargs):
    """``Searcher.from_paths`` for either store: load the model, then its collection (mismatches refused)."""
    from ..model.persistence import load_model
    from .searcher import Searcher

    model = load_model(model_path)
    return Searcher(model, open_collection(location, store=store, model=model), **kwargs)
