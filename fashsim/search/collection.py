"""A searchable collection: FAISS vectors (:mod:`fashsim.search.index`) + SQLite metadata
(:mod:`fashsim.search.metadata`), kept consistent, filtered by category or any metadata predicate, and
saved to / loaded from one directory safely.

On disk::

    <directory>/CURRENT                 name of the complete version to load
    <directory>/v-<timestamp>/manifest.json   format, model fingerprint, dim, kind, factory, params, sha256 of files
    <directory>/v-<timestamp>/vectors.faiss
    <directory>/v-<timestamp>/ids.npy
    <directory>/v-<timestamp>/catalog.sqlite

A save writes a whole new version (files fsync'ed) and only then switches ``CURRENT`` with an
atomic rename, so a process killed mid-save leaves the previous version loadable. Savers take
turns (a lock file, ``.save.lock``); the version before the current one is kept until the next
save, and a load that loses its version to a concurrent save reads the new one. Loading
verifies the checksums (a truncated or corrupted file is refused) and, given the model, that the
index was built by that very model (dimension and fingerprint). ``factory`` is the FAISS factory
string of the index (:mod:`fashsim.search.index`); collections saved before it was recorded have
only ``kind`` and load as well.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FashsimError
from ..fileio import atomic_write_bytes, exclusive_lock, fsync_dir, fsync_file, sha256_file
from .filters import to_predicate
from .index import VectorIndex, choose_kind
from .metadata import MetadataError, MetadataStore

FORMAT_VERSION = 1
FILES = ("vectors.faiss", "ids.npy", "catalog.sqlite")
SAVE_LOCK = ".save.lock"  # held while a version is written (savers take turns)
LOAD_ATTEMPTS = 5  # a load that lost its version to a concurrent save reads the newer one, this many times at most


class IndexMismatchError(FashsimError):
    """The saved index does not belong to the model it is used with."""


class CorruptIndexError(FashsimError):
    """A saved collection is incomplete, truncated or corrupted."""


@dataclass
class Hit:
    """One search result."""

    rank: int
    id: int
    score: float
    category: str
    source: str
    extra: dict = field(default_factory=dict)


class Collection:
    """Vectors + metadata with one id space (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        model_fingerprint: str | None = None,
        use_gpu: bool | str = "auto",
        **index_params,
    ) -> None:
        self.index = VectorIndex(dim, kind, use_gpu=use_gpu, **index_params)
        self.metadata = MetadataStore()
        self.model_fingerprint = model_fingerprint

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        records: Sequence[Mapping],
        *,
        kind: str = "auto",
        model_fingerprint: str | None = None,
        train_sample: int = 100_000,
        seed: int = 0,
        **index_params,
    ) -> Collection:
        """A new collection over ``embeddings`` (one record per row); ``kind='auto'`` picks by size."""
        kind = choose_kind(len(embeddings)) if kind == "auto" else kind
        collection = cls(embeddings.shape[1], kind, model_fingerprint=model_fingerprint, **index_params)
        if collection.index.needs_training:
            rng = np.random.default_rng(seed)
            sample = embeddings[rng.choice(len(embeddings), min(train_sample, len(embeddings)), replace=False)]
            collection.index.train(sample, n_items=len(embeddings))
        collection.add(embeddings, records)
        return collection

    @property
    def dim(self) -> int:
        """The embedding dimension the index holds."""
        return self.index.dim

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------ content
    def add(self, embeddings: np.ndarray, records: Sequence[Mapping]) -> None:
        """Add items (no rebuild): metadata and vectors together, or neither."""
        if len(records) != len(embeddings):
            raise FashsimError(f"{len(embeddings)} embeddings but {len(records)} records")
        ids = self.metadata.add(records)
        try:
            self.index.add(embeddings, ids)
        except Exception:
            self.metadata.remove(ids)  # keep the two in step
            raise

    def remove(self, ids) -> int:
        """Remove items by id from both the index and the catalog (no rebuild)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        removed = self.index.remove(ids)
        self.metadata.remove(ids)
        return removed

    def categories(self) -> dict[str, int]:
        """Items per category."""
        return self.metadata.categories()

    # ------------------------------------------------------------ search
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        category: str | None = None,
        where: Mapping | Callable[[dict], bool] | None = None,
        log: bool = False,
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query, optionally only of ``category`` and/or records matching
        ``where``: a dict of conditions (:mod:`fashsim.search.filters`) or ``where(record) -> bool``."""
        allowed = None
        if category is not None:
            allowed = self.metadata.ids(category)
        if where is not None:
            matching = self.metadata.ids_where(to_predicate(where))
            allowed = matching if allowed is None else np.intersect1d(allowed, matching)
        depth = min(k, max(1, len(self.index))) if k > 0 else k  # a huge k would allocate queries × k
        scores, ids = self.index.search(queries, depth, allowed_ids=allowed)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            valid = row_ids >= 0
            records = self.metadata.get(row_ids[valid])
            hits = [
                Hit(
                    rank=r + 1,
                    id=int(i),
                    score=float(s),
                    category=rec["category"],
                    source=rec["source"],
                    extra={k_: v for k_, v in rec.items() if k_ not in ("id", "source", "category")},
                )
                for r, (i, s, rec) in enumerate(zip(row_ids[valid], row_scores[valid], records))
            ]
            if log:
                self.metadata.log_search(k, category, [h.id for h in hits])
            results.append(hits)
        return results

    def near_duplicate_pairs(self, threshold: float = 0.99) -> list[tuple[int, int, float]]:
        """Pairs of items whose embeddings have cosine similarity ≥ ``threshold`` (FAISS range
        search), most similar first: ``(id_a, id_b, similarity)`` with ``id_a < id_b``."""
        ids = self.index.ids()
        if len(ids) < 2:
            return []
        lims, scores, neighbours = self.index.range_search(self.index.reconstruct(ids), threshold)
        rows = np.repeat(ids, np.diff(lims))
        keep = rows < neighbours  # each pair once, and not an item with itself
        order = np.argsort(-scores[keep], kind="stable")
        a, b, sim = rows[keep][order], neighbours[keep][order], scores[keep][order]
        return [(int(x), int(y), float(z)) for x, y, z in zip(a, b, sim)]

    def near_duplicates(self, threshold: float = 0.99) -> list[list[int]]:
        """Groups of ids linked by :meth:`near_duplicate_pairs` (connected components), largest
        first; singletons omitted. A low threshold chains merely similar items into big groups."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        pairs = self.near_duplicate_pairs(threshold)
        if not pairs:
            return []
        ids = self.index.ids()
        a, b, _ = (np.asarray(column) for column in zip(*pairs))
        rows, cols = np.searchsorted(ids, a), np.searchsorted(ids, b)
        graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids)))
        _, labels = connected_components(graph, directed=False)
        groups = [ids[labels == c].tolist() for c in np.unique(labels)]
        return sorted((g for g in groups if len(g) > 1), key=len, reverse=True)

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Save atomically as a new version of ``directory`` (see the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(directory / SAVE_LOCK):  # two savers: one after the other, never in each other's files
            return self._save_version(directory)

    def _save_version(self, directory: Path) -> Path:
        pointer = directory / "CURRENT"
        previous = pointer.read_text().strip() if pointer.is_file() else None
        version = f"v-{time.time_ns()}"
        staging = directory / f".{version}.partial"
        staging.mkdir()
        ids = self.index.ids()
        (staging / "vectors.faiss").write_bytes(self.index.to_bytes())
        np.save(staging / "ids.npy", ids)
        self.metadata.save(staging / "catalog.sqlite")
        if not np.array_equal(self.metadata.ids(), ids):
            raise FashsimError("index and catalog disagree on their ids; refusing to save an inconsistent collection")
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "embedding_dim": self.dim,
            "kind": self.index.kind,
            "factory": self.index.factory,
            "params": self.index.params,
            "count": len(ids),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sha256": {name: sha256_file(staging / name) for name in FILES},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for name in (*FILES, "manifest.json"):
            fsync_file(staging / name)
        final = directory / version
        os.replace(staging, final)
        fsync_dir(directory)
        atomic_write_bytes(pointer, version.encode())
        # older versions and abandoned partial saves go; the previous version stays until the next
        # save, for a reader that read CURRENT just before the switch
        for old in directory.iterdir():
            if (
                old.is_dir()
                and old.name not in (version, previous)
                and (old.name.startswith("v-") or old.name.endswith(".partial"))
            ):
                shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, model=None, expected_dim: int | None = None, use_gpu: bool | str = "auto"
    ) -> Collection:
        """Load the current version of ``directory``. With ``model`` (an EmbeddingNet), refuse an
        index built by another model; checksums guard against truncated or corrupted files."""
        directory = Path(directory)
        pointer = directory / "CURRENT"
        if not pointer.is_file():
            raise CorruptIndexError(
                f"no saved index in {directory} (CURRENT is missing): build it first "
                "(notebook 03 or `python -m fashsim index`; a shop: `python -m fashsim shop build`)"
            )
        for attempt in range(LOAD_ATTEMPTS):
            name = pointer.read_text().strip()
            try:
                return cls._load_version(directory / name, model=model, expected_dim=expected_dim, use_gpu=use_gpu)
            except (CorruptIndexError, MetadataError, OSError, sqlite3.Error):
                # another process saved a newer version (and removed this one) while it was read: read
                # the newer one; a version that is still current is really broken
                if attempt == LOAD_ATTEMPTS - 1 or pointer.read_text().strip() == name:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load_version(
        cls, version: Path, *, model=None, expected_dim: int | None = None, use_gpu: bool | str = "auto"
    ) -> Collection:
        directory = version.parent
        try:
            manifest = json.loads((version / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"{version}: unreadable manifest ({exc})") from None
        needed = ("sha256", "model_fingerprint", "embedding_dim", "kind", "params")
        if not (
            isinstance(manifest, dict)
            and all(key in manifest for key in needed)
            and isinstance(manifest["sha256"], dict)
        ):
            raise CorruptIndexError(
                f"{version}: the manifest is damaged (it needs {', '.join(needed)}); rebuild the index"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptIndexError(f"{version}: format {manifest.get('format_version')} is not {FORMAT_VERSION}")
        for name in FILES:
            path = version / name
            if not path.is_file() or sha256_file(path) != manifest["sha256"].get(name):
                raise CorruptIndexError(
                    f"{path} is missing, truncated or corrupted (checksum mismatch); rebuild the index"
                )
        if model is not None:
            from ..model.persistence import fingerprint

            expected_dim = model.embedding_dim
            actual = fingerprint(model)
            if manifest["model_fingerprint"] != actual:
                raise IndexMismatchError(
                    f"the index in {directory} was built with model {manifest['model_fingerprint']}, "
                    f"not with the loaded model {actual}: rebuild the index with this model "
                    "(notebook 03 or `python -m fashsim index`; a shop: `python -m fashsim shop build`)"
                )
        if expected_dim is not None and manifest["embedding_dim"] != expected_dim:
            raise IndexMismatchError(
                f"the index holds {manifest['embedding_dim']}-d vectors, the model makes "
                f"{expected_dim}-d embeddings: rebuild the index with this model"
            )
        collection = cls.__new__(cls)
        collection.index = VectorIndex.from_bytes(
            (version / "vectors.faiss").read_bytes(),
            np.load(version / "ids.npy"),
            kind=manifest["kind"],
            dim=manifest["embedding_dim"],
            params=manifest["params"],
            factory=manifest.get("factory"),
            use_gpu=use_gpu,
        )
        collection.metadata = MetadataStore.load(version / "catalog.sqlite")
        collection.model_fingerprint = manifest["model_fingerprint"]
        if not np.array_equal(collection.metadata.ids(), collection.index.ids()):
            raise CorruptIndexError(f"{version}: the catalog and the index hold different ids; rebuild the index")
        return collection
