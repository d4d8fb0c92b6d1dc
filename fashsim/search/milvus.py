"""A searchable collection in Milvus: the same public API as :class:`~fashsim.search.collection.Collection`
(FAISS + SQLite), for collections that outgrow one process.

Where the data lives (``location``):

* **Milvus Lite** (embedded, pure Python, single process): a path ending in ``.db`` — the Lite
  database (a folder) — or any other folder, which then holds ``milvus.db``. Milvus Lite locks the
  database: one process at a time (a second process gets "another process holds the lock").
* **a Milvus server or cluster**: ``http://host:19530`` (``https://`` with TLS, ``token=`` for
  ``user:password`` or an API key, also read from ``MILVUS_TOKEN``). ``uri#name`` names the Milvus
  collection; it is ``fashsim`` by default (``collection_name=``).

One Milvus collection holds everything (no separate catalog): ``id`` (INT64 primary key),
``vector`` (FLOAT_VECTOR), ``source`` and ``category`` (VARCHAR, ``category`` with an INVERTED
scalar index) and ``extra`` (JSON: every other record field). The model fingerprint, the index
kind and its parameters are collection *properties* (``fashsim.*``), checked by :meth:`MilvusCollection.load`
like the FAISS manifest: an index built by another model raises :class:`IndexMismatchError`.

Index kinds, as in :mod:`fashsim.search.index`: ``flat`` (exact, Milvus ``FLAT``), ``hnsw``
(``HNSW``, ``M``/``efConstruction``, search ``ef``), ``ivfpq`` (``IVF_PQ``: servers only, Milvus
Lite has no product quantisation) and ``auto`` (flat below 200 000 items, HNSW above). The metric is
``COSINE`` (equal to the inner product FAISS uses on fashsim's L2-normalised embeddings); ``IP``
can be asked for.

Differences from the FAISS collection, on purpose:

* ``where`` also takes a Milvus filter expression string (see :mod:`fashsim.search.filters`); a
  Python callable still works but reads every record (slow on big collections).
* Writes go to Milvus at once (a Lite database is durable after each write): :meth:`save` with no
  argument only flushes; :meth:`save` to another location copies the collection there.
* A build replaces an existing collection of the same name only when it is complete (it is
  built under a staging name, then renamed).
* The search history (``log=True``) is kept in memory, not in the database.
* ``near_duplicates`` (FAISS range search) is not offered.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import FashsimError
from .collection import CorruptIndexError, Hit, IndexMismatchError
from .filters import milvus_expressible, milvus_literal, to_milvus_expression, to_predicate
from .index import VectorIndexError, as_ids, unit_vectors
from .metadata import MetadataError, few_valued_fields, field_kinds, record_row

FORMAT_VERSION = 1
DEFAULT_COLLECTION = "fashsim"
LITE_FILE = "milvus.db"
KINDS = ("flat", "hnsw", "ivfpq", "auto")
AUTO_HNSW_FROM = 200_000
MAX_TOPK = 16_384  # Milvus limits: top-k and queries per request
MAX_NQ = 16_384
INSERT_BATCH = 5_000  # rows per insert request (well under Milvus's 64 MB per request)
#: a server's staging collection this old is taken as left behind by a killed build (Lite: any)
ABANDONED_STAGING_SECONDS = 24 * 3600
ID_CHUNK = 1_000  # ids per `id in [...]` expression
PROPERTY = "fashsim."
INSTALL_HINT = "pip install -e '.[milvus]'  (pymilvus + milvus-lite)"


class MilvusNotInstalledError(FashsimError, ImportError):
    """pymilvus (or milvus-lite, for a local .db) is not installed."""


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MilvusNotInstalledError(f"the Milvus store needs pymilvus: {INSTALL_HINT}") from None
    return pymilvus


# ---------------------------------------------------------------- locations and clients
def is_server_uri(location) -> bool:
    """True for a Milvus server address (``http(s)://``, ``tcp://``, ``grpc://``), False for a Milvus Lite file."""
    return isinstance(location, str) and location.split("://", 1)[0].lower() in ("http", "https", "tcp", "grpc")


def resolve_location(location, collection_name: str | None = None) -> tuple[str, str, bool]:
    """``(uri, collection name, is_lite)`` for a location (see the module docstring)."""
    if is_server_uri(location):
        uri, _, fragment = str(location).partition("#")
        return uri, collection_name or fragment or DEFAULT_COLLECTION, False
    path = Path(location).expanduser()
    if path.suffix != ".db":
        path = path / LITE_FILE
    return str(path.resolve()), collection_name or DEFAULT_COLLECTION, True


# The Lite server of a path runs in this process and locks the database until it is stopped. It is
# stopped when the last MilvusCollection using it closes, unless a caller's own client uses it too.
_lite_users: Counter = Counter()  # Lite path -> open MilvusCollection objects in this process
_lite_shared: set[str] = set()  # Lite paths also used through a caller's client: left running
_lite_lock = threading.RLock()  # re-entrant: a finalizer may run (garbage collection) while it is held


def _lite_acquire(uri: str, *, shared: bool) -> None:
    with _lite_lock:
        _lite_users[uri] += 1
        if shared:
            _lite_shared.add(uri)


def _lite_drop(uri: str) -> bool:
    """One user fewer; True when the server of ``uri`` should now be stopped."""
    with _lite_lock:
        _lite_users[uri] -= 1
        if _lite_users[uri] > 0:
            return False
        del _lite_users[uri]
        return uri not in _lite_shared


class _QuietLiteIterator(logging.Filter):
    """Milvus Lite sends no MVCC timestamp for query iterators; pymilvus then warns on every scan
    and falls back to a client-side timestamp, which is right for one local process."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed to get mvccTs")


class _LiteStartFailure(logging.Filter):
    """Keeps Milvus Lite's own traceback of a server that failed to start (e.g. a database another
    process holds) off the terminal, keeping its reason for fashsim's one-line error."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            self.reasons.append(str(record.exc_info[1]))
        return False


def _connect(uri: str, is_lite: bool, token: str | None):
    pymilvus = _pymilvus()
    if is_lite:
        iterator_log = logging.getLogger("pymilvus.client.iterator.query_iterator")
        if not any(isinstance(f, _QuietLiteIterator) for f in iterator_log.filters):
            iterator_log.addFilter(_QuietLiteIterator())
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise MilvusNotInstalledError(f"a local Milvus .db needs milvus-lite: {INSTALL_HINT}") from None
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        _lite_acquire(uri, shared=False)  # before the client: a finalizer must not stop the server meanwhile
        start_log, failure = logging.getLogger("milvus_lite.server_manager"), _LiteStartFailure()
        start_log.addFilter(failure)
        try:
            return pymilvus.MilvusClient(uri)
        except pymilvus.MilvusException as exc:
            _lite_drop(uri)
            raise FashsimError(
                f"cannot open the Milvus Lite database {uri} ({'; '.join(failure.reasons) or exc.message}); "
                "Milvus Lite allows one process at a time: is another one (a notebook, the demo) using it?"
            ) from None
        finally:
            start_log.removeFilter(failure)
    token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
    try:
        return pymilvus.MilvusClient(uri=uri, token=token)
    except pymilvus.MilvusException as exc:
        raise FashsimError(f"cannot reach the Milvus server {uri} ({exc.message})") from None


def _release(uri: str, is_lite: bool, client, owns_client: bool) -> None:
    if owns_client:
        client.close()
    if is_lite and _lite_drop(uri):  # stop the in-process Lite server: frees the database for other processes
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:
            return
        server_manager_instance.release_server(uri)


def _index_spec(kind: str, params: dict, metric: str, is_lite: bool) -> tuple[str, dict]:
    if kind == "flat":
        return "FLAT", {}
    if kind == "hnsw":
        return "HNSW", {"M": int(params["hnsw_m"]), "efConstruction": int(params["ef_construction"])}
    if kind == "ivfpq":
        if is_lite:
            raise FashsimError(
                "Milvus Lite has no product-quantisation index: use kind='hnsw' (or 'flat'), "
                "or a Milvus server for ivfpq"
            )
        return "IVF_PQ", {"nlist": int(params["nlist"]), "m": int(params["pq_m"]), "nbits": 8}
    raise ValueError(f"kind must be one of flat, hnsw, ivfpq (resolve 'auto' first), got {kind!r}")


def choose_kind(n_items: int) -> str:
    """The ``auto`` rule for Milvus: exact below :data:`AUTO_HNSW_FROM` items, HNSW above."""
    return "flat" if n_items < AUTO_HNSW_FROM else "hnsw"


def _records_to_rows(x: np.ndarray, records: Sequence[Mapping]) -> tuple[list[dict], np.ndarray]:
    rows, ids = [], []
    for vector, record in zip(x, records):
        item_id, source, category, extra = record_row(record)  # as the SQLite catalog keeps it
        rows.append(
            {"id": item_id, "vector": vector, "source": source, "category": category, "extra": json.loads(extra)}
        )
        ids.append(item_id)
    ids = as_ids(ids)  # ≥ 0, as in the FAISS collection
    if len(np.unique(ids)) != len(ids):
        raise MetadataError("the records repeat an id")
    return rows, ids


def _id_filter(ids) -> str:
    return f"id in [{', '.join(str(int(i)) for i in ids)}]"


# ---------------------------------------------------------------- views (what callers of Collection use)
class MilvusMetadata:
    """Catalog access with :class:`~fashsim.search.metadata.MetadataStore`'s reading API
    (``get``, ``ids``, ``existing``, ``ids_where``, ``categories``, ``len``, ``history``)."""

    def __init__(self, owner: MilvusCollection) -> None:
        self._owner = owner
        self._history: list[dict] = []

    def __len__(self) -> int:
        return len(self._owner)

    def get(self, ids) -> list[dict | None]:
        """Records of ``ids`` in the same order (None where an id is unknown)."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        found: dict[int, dict] = {}
        for start in range(0, len(ids), ID_CHUNK):
            chunk = sorted(set(ids[start : start + ID_CHUNK]))
            for row in self._owner._query(_id_filter(chunk), ["id", "source", "category", "extra"]):
                found[int(row["id"])] = {
                    "id": int(row["id"]),
                    "source": row["source"],
                    "category": row["category"],
                    **(row.get("extra") or {}),
                }
        return [found.get(i) for i in ids]

    def ids(self, category: str | None = None) -> np.ndarray:
        """All ids, or those of one category, sorted."""
        expr = "" if category is None else f"category == {milvus_literal(category)}"
        ids = [int(r["id"]) for r in self._owner._scan(expr, ["id"])]
        return np.sort(np.asarray(ids, dtype=np.int64))

    def existing(self, ids) -> np.ndarray:
        """Which of ``ids`` are in the collection, sorted."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        found = []
        for start in range(0, len(wanted), ID_CHUNK):
            found += [int(r["id"]) for r in self._owner._query(_id_filter(wanted[start : start + ID_CHUNK]), ["id"])]
        return np.sort(np.asarray(found, dtype=np.int64))

    def ids_where(self, predicate: Callable[[dict], bool]) -> np.ndarray:
        """Ids of the records for which ``predicate(record)`` holds (reads every record)."""
        matching = [
            int(r["id"])
            for r in self._owner._scan("", ["id", "source", "category", "extra"])
            if predicate(
                {"id": int(r["id"]), "source": r["source"], "category": r["category"], **(r.get("extra") or {})}
            )
        ]
        return np.sort(np.asarray(matching, dtype=np.int64))

    def categories(self) -> dict[str, int]:
        """Category → number of items, sorted by name (reads the category of every item; cached
        until this object writes)."""
        owner = self._owner
        if owner._categories is None:
            counts = Counter(r["category"] for r in owner._scan("", ["category"]))
            owner._categories = dict(sorted(counts.items()))
        return dict(owner._categories)

    def field_values(self, max_distinct: int = 12) -> dict[str, list]:
        """The further (``extra``) fields with at most ``max_distinct`` distinct scalar values, as
        :meth:`fashsim.search.metadata.MetadataStore.field_values` (reads every record)."""
        return few_valued_fields((r.get("extra") or {} for r in self._owner._scan("", ["extra"])), max_distinct)

    def field_kinds(self) -> dict[str, str]:
        """Each field → number | text | mixed, as :meth:`fashsim.search.metadata.MetadataStore.field_kinds`
        (reads every record)."""
        return field_kinds(r.get("extra") or {} for r in self._owner._scan("", ["extra"]))

    def log_search(self, k: int, category: str | None, result_ids) -> None:
        self._history.append(
            {"at": time.time(), "k": int(k), "category": category, "result_ids": [int(i) for i in result_ids]}
        )

    def history(self, limit: int = 20) -> list[dict]:
        """The latest searches of this object, newest first (kept in memory only)."""
        return list(reversed(self._history[-limit:])) if limit > 0 else []


class MilvusIndexInfo:
    """The vector-index side with :class:`~fashsim.search.index.VectorIndex`'s reading API
    (``kind``, ``params``, ``dim``, ``ids()``, ``len``, ``in``, ``reconstruct``, ``set_search_effort``)."""

    def __init__(self, owner: MilvusCollection) -> None:
        self._owner = owner

    @property
    def kind(self) -> str:
        return self._owner._kind

    @property
    def params(self) -> dict:
        return dict(self._owner._params)

    @property
    def dim(self) -> int:
        return self._owner._dim

    @property
    def device(self) -> str:
        return "milvus"

    def __len__(self) -> int:
        return len(self._owner)

    def ids(self) -> np.ndarray:
        return self._owner.metadata.ids()

    def __contains__(self, item_id: int) -> bool:
        return len(self._owner.metadata.existing([item_id])) == 1

    def reconstruct(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (unknown ids raise)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vectors: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), ID_CHUNK):
            for row in self._owner._query(_id_filter(np.unique(ids[start : start + ID_CHUNK])), ["id", "vector"]):
                vectors[int(row["id"])] = np.asarray(row["vector"], dtype=np.float32)
        missing = [int(i) for i in ids if int(i) not in vectors]
        if missing:
            raise VectorIndexError(f"{len(missing)} ids are not in the index (e.g. {missing[:5]})")
        return np.stack([vectors[int(i)] for i in ids]) if len(ids) else np.empty((0, self.dim), np.float32)

    def set_search_effort(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall: HNSW ``ef``, IVF ``nprobe`` (for this object's searches)."""
        if ef_search is not None:
            self._owner._params["ef_search"] = int(ef_search)
        if nprobe is not None:
            self._owner._params["nprobe"] = int(nprobe)


# ---------------------------------------------------------------- the collection
class MilvusCollection:
    """Vectors + metadata in one Milvus collection (see the module docstring)."""

    DEFAULT_PARAMS = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128, "nlist": 1024, "pq_m": 32, "nprobe": 32}

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        location=None,
        collection_name: str | None = None,
        model_fingerprint: str | None = None,
        metric: str = "COSINE",
        token: str | None = None,
        client=None,
        overwrite: bool = False,
        use_gpu: bool | str = "auto",
        **index_params,
    ) -> None:
        """A new, empty collection. ``location=None``: a private temporary Milvus Lite database
        (deleted on :meth:`close`; :meth:`save` copies it somewhere lasting). An existing collection of
        the same name raises unless ``overwrite``. ``use_gpu`` is accepted for API compatibility and
        ignored (GPU indexes are a server-side choice). ``client``: a ``MilvusClient`` to share (tests)."""
        if kind not in KINDS or kind == "auto":
            raise ValueError(f"kind must be one of flat, hnsw, ivfpq (resolve 'auto' with choose_kind), got {kind!r}")
        if metric not in ("COSINE", "IP"):
            raise ValueError(f"metric must be COSINE or IP, got {metric!r}")
        unknown = set(index_params) - set(self.DEFAULT_PARAMS)
        if unknown:
            raise TypeError(f"unknown index parameters: {', '.join(sorted(unknown))}")
        tempdir = None
        if location is None:
            tempdir = tempfile.mkdtemp(prefix="fashsim-milvus-")
            location = Path(tempdir) / LITE_FILE
        self._open(location, collection_name, token, client, tempdir)
        params = {**self.DEFAULT_PARAMS, **index_params}
        try:
            self._create(self._name, int(dim), kind, params, metric, model_fingerprint, overwrite=overwrite)
        except BaseException:
            self.close()
            raise
        self._read_properties()

    # ------------------------------------------------------------ set-up
    def _open(self, location, collection_name, token, client, tempdir) -> None:
        self._uri, self._name, self._is_lite = resolve_location(location, collection_name)
        self._owns_client = client is None
        self._client = client if client is not None else _connect(self._uri, self._is_lite, token)
        if client is not None and self._is_lite:
            _lite_acquire(self._uri, shared=True)
        self._token = token
        self._tempdir = tempdir
        self._categories: dict | None = None
        self._closed = False
        self.metadata = MilvusMetadata(self)
        self.index = MilvusIndexInfo(self)
        self._finalizer = weakref.finalize(
            self, _cleanup, self._uri, self._is_lite, self._client, self._owns_client, tempdir
        )

    def _create(
        self,
        name: str,
        dim: int,
        kind: str,
        params: dict,
        metric: str,
        model_fingerprint: str | None,
        *,
        overwrite: bool,
    ) -> None:
        pymilvus = _pymilvus()
        client = self._client
        if client.has_collection(name):
            if not overwrite:
                raise FashsimError(
                    f"{self.location} already holds a collection {name!r}: open it with load(), "
                    "or pass overwrite=True to replace it"
                )
            client.drop_collection(name)
        index_type, build_params = _index_spec(kind, params, metric, self._is_lite)
        schema = pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description="fashsim catalog: image embeddings + metadata"
        )
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("source", pymilvus.DataType.VARCHAR, max_length=65_535)
        schema.add_field("category", pymilvus.DataType.VARCHAR, max_length=1_024)
        schema.add_field("extra", pymilvus.DataType.JSON)
        indexes = client.prepare_index_params()
        indexes.add_index(
            field_name="vector", index_name="vector", index_type=index_type, metric_type=metric, params=build_params
        )
        indexes.add_index(field_name="category", index_name="category", index_type="INVERTED")
        properties = {
            f"{PROPERTY}format_version": str(FORMAT_VERSION),
            f"{PROPERTY}model_fingerprint": model_fingerprint or "",
            f"{PROPERTY}kind": kind,
            f"{PROPERTY}params": json.dumps(params, sort_keys=True),
            f"{PROPERTY}metric": metric,
            f"{PROPERTY}dim": str(dim),
        }
        client.create_collection(
            name, schema=schema, index_params=indexes, consistency_level="Strong", properties=properties
        )
        client.load_collection(name)

    def _read_properties(self) -> None:
        client = self._client
        if not client.has_collection(self._name):
            raise CorruptIndexError(
                f"no collection {self._name!r} in {self.location}: build it first "
                "(notebook 03 or `python -m fashsim index`; a shop: `python -m fashsim shop build`)"
            )
        description = client.describe_collection(self._name)
        props = description.get("properties") or {}
        if f"{PROPERTY}format_version" not in props:
            raise CorruptIndexError(f"the Milvus collection {self._name!r} in {self.location} was not made by fashsim")
        if props[f"{PROPERTY}format_version"] != str(FORMAT_VERSION):
            raise CorruptIndexError(
                f"{self.location}: format {props[f'{PROPERTY}format_version']} is not "
                f"{FORMAT_VERSION}; rebuild the index"
            )
        self.model_fingerprint = props[f"{PROPERTY}model_fingerprint"] or None
        self._kind = props[f"{PROPERTY}kind"]
        self._params = {**self.DEFAULT_PARAMS, **json.loads(props[f"{PROPERTY}params"])}
        self._metric = props[f"{PROPERTY}metric"]
        self._dim = int(props[f"{PROPERTY}dim"])
        state = client.get_load_state(self._name).get("state")
        if "Loaded" not in str(state):  # a reopened or renamed collection starts released
            client.load_collection(self._name)

    # ------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        records: Sequence[Mapping],
        *,
        kind: str = "auto",
        model_fingerprint: str | None = None,
        location=None,
        collection_name: str | None = None,
        metric: str = "COSINE",
        token: str | None = None,
        client=None,
        seed: int = 0,
        train_sample: int = 100_000,
        **index_params,
    ) -> MilvusCollection:
        """A new collection over ``embeddings`` (one record per row), like ``Collection.build``. At a
        ``location`` that already holds the collection, the old one is replaced only once the new
        one is complete (built under a staging name, then renamed). ``seed``/``train_sample`` are
        accepted for compatibility (Milvus trains IVF indexes itself)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        kind = choose_kind(len(embeddings)) if kind == "auto" else kind
        if embeddings.ndim != 2:
            raise VectorIndexError(f"embeddings must be a 2-d array, got shape {embeddings.shape}")
        if location is None:
            collection = cls(
                embeddings.shape[1], kind, model_fingerprint=model_fingerprint, metric=metric, **index_params
            )
            try:
                collection.add(embeddings, records)
            except BaseException:
                collection.close()
                raise
            return collection
        uri, name, _ = resolve_location(location, collection_name)
        staging = f"{name}_staging_{time.time_ns()}"
        collection = cls(
            embeddings.shape[1],
            kind,
            location=location,
            collection_name=staging,
            model_fingerprint=model_fingerprint,
            metric=metric,
            token=token,
            client=client,
            **index_params,
        )
        try:
            collection.add(embeddings, records)
            collection._rename(name)
        except BaseException:
            collection._drop_quietly()
            collection.close()
            raise
        return collection

    @classmethod
    def load(
        cls,
        location,
        *,
        model=None,
        expected_dim: int | None = None,
        collection_name: str | None = None,
        token: str | None = None,
        client=None,
        use_gpu: bool | str = "auto",
    ) -> MilvusCollection:
        """Open the collection at ``location``. With ``model`` (an EmbeddingNet), refuse one built by
        another model (:class:`IndexMismatchError`), like ``Collection.load``; a missing collection
        raises :class:`CorruptIndexError`. ``use_gpu`` is ignored."""
        if not is_server_uri(location) and not Path(resolve_location(location)[0]).exists():
            raise CorruptIndexError(
                f"no Milvus Lite database at {resolve_location(location)[0]}: build it first "
                "(notebook 03 or `python -m fashsim index --store milvus`)"
            )
        collection = cls.__new__(cls)
        collection._open(location, collection_name, token, client, None)
        try:
            collection._read_properties()
            if model is not None:
                from ..model.persistence import fingerprint

                expected_dim = model.embedding_dim
                actual = fingerprint(model)
                if collection.model_fingerprint != actual:
                    raise IndexMismatchError(
                        f"the index in {collection.location} was built with model {collection.model_fingerprint}, "
                        f"not with the loaded model {actual}: rebuild the index with this model "
                        "(notebook 03 or `python -m fashsim index`; a shop: `python -m fashsim shop build`)"
                    )
            if expected_dim is not None and collection.dim != expected_dim:
                raise IndexMismatchError(
                    f"the index holds {collection.dim}-d vectors, the model makes "
                    f"{expected_dim}-d embeddings: rebuild the index with this model"
                )
        except BaseException:
            collection.close()
            raise
        return collection

    # ------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def name(self) -> str:
        """The Milvus collection's name."""
        return self._name

    @property
    def location(self) -> str:
        """The Lite database path or the server URI (with ``#name``)."""
        return self._uri if self._is_lite else f"{self._uri}#{self._name}"

    @property
    def client(self):
        """The underlying ``pymilvus.MilvusClient``."""
        return self._client

    def __len__(self) -> int:
        rows = self._client.query(self._name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __repr__(self) -> str:
        return f"MilvusCollection({self.location!r}, kind={self._kind!r}, dim={self._dim})"

    def close(self) -> None:
        """Close the client (a temporary database is deleted; a Lite database is unlocked once no
        collection of this process uses it)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        detached = self._finalizer.detach()
        if detached is not None:
            _, function, args, _ = detached
            function(*args, in_gc=False)

    def __enter__(self) -> MilvusCollection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ Milvus helpers
    def _query(self, expr: str, fields: list[str]) -> list[dict]:
        return self._client.query(self._name, filter=expr, output_fields=fields)

    def _scan(self, expr: str, fields: list[str], batch_size: int = 10_000):
        """Every row matching ``expr`` (an iterator: no result-window limit)."""
        iterator = self._client.query_iterator(self._name, batch_size=batch_size, filter=expr, output_fields=fields)
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    return
                yield from batch
        finally:
            iterator.close()

    def _rename(self, name: str) -> None:
        """Become ``name``, replacing a collection of that name (the swap at the end of a build)."""
        client = self._client
        if client.has_collection(name):
            client.drop_collection(name)
        client.rename_collection(self._name, name)
        self._name = name
        client.load_collection(name)
        self._drop_abandoned_staging()

    def _drop_abandoned_staging(self) -> None:
        """Drop what builds and copies of this collection that were killed left behind
        (``<name>_staging_<time>``): every one on Milvus Lite, which one process holds at a time;
        on a server, those over :data:`ABANDONED_STAGING_SECONDS` old (another client's build may
        still be writing a younger one)."""
        prefix = f"{self._name}_staging_"
        now = time.time_ns()
        for other in self._client.list_collections():
            started = other[len(prefix) :]
            if not other.startswith(prefix) or not started.isdigit():
                continue
            if self._is_lite or now - int(started) > ABANDONED_STAGING_SECONDS * 1e9:
                try:
                    self._client.drop_collection(other)
                except Exception:  # noqa: BLE001 - best effort: the next build tries again
                    pass

    def _drop_quietly(self) -> None:
        try:
            self._client.drop_collection(self._name)
        except Exception:  # noqa: BLE001 - best-effort clean-up after a failed build; the first error matters
            pass

    # ------------------------------------------------------------ content
    def add(self, embeddings: np.ndarray, records: Sequence[Mapping]) -> None:
        """Add items; ids already present raise :class:`MetadataError` (use :meth:`upsert`). All
        rows are written or, when a write fails half-way, the written ones are deleted again."""
        x = unit_vectors(embeddings, self._dim)
        if len(records) != len(x):
            raise FashsimError(f"{len(x)} embeddings but {len(records)} records")
        rows, ids = _records_to_rows(x, records)
        taken = self.metadata.existing(ids)
        if len(taken):
            raise MetadataError(f"{len(taken)} ids already exist in the catalog (e.g. {taken[:5].tolist()})")
        self._categories = None
        written = 0
        try:
            for start in range(0, len(rows), INSERT_BATCH):
                self._client.insert(self._name, rows[start : start + INSERT_BATCH])
                written = min(len(rows), start + INSERT_BATCH)
        except BaseException:
            for start in range(0, written, ID_CHUNK):
                self._client.delete(self._name, ids=ids[start : min(written, start + ID_CHUNK)].tolist())
            raise

    def upsert(self, embeddings: np.ndarray, records: Sequence[Mapping]) -> None:
        """Add items, replacing the vector and record of ids that are already present."""
        x = unit_vectors(embeddings, self._dim)
        if len(records) != len(x):
            raise FashsimError(f"{len(x)} embeddings but {len(records)} records")
        rows, _ = _records_to_rows(x, records)
        self._categories = None
        for start in range(0, len(rows), INSERT_BATCH):
            self._client.upsert(self._name, rows[start : start + INSERT_BATCH])

    def remove(self, ids) -> int:
        """Remove items by id; ids that are not there raise (as with the FAISS collection)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        present = self.metadata.existing(ids)
        if len(present) != len(np.unique(ids)):
            missing = np.setdiff1d(ids, present)
            raise VectorIndexError(f"{missing.size} ids are not in the index (e.g. {missing[:5].tolist()})")
        self._categories = None
        for start in range(0, len(present), ID_CHUNK):
            self._client.delete(self._name, ids=present[start : start + ID_CHUNK].tolist())
        return int(present.size)

    def categories(self) -> dict[str, int]:
        return self.metadata.categories()

    # ------------------------------------------------------------ search
    def filter_expression(self, *, category: str | None = None, where=None) -> str | None:
        """The Milvus filter for a ``category`` and a ``where`` (dict, expression string or callable);
        ``None`` when nothing can match (a callable that matches no record). A dict naming a field
        that a Milvus expression cannot hold (e.g. "Base Colour") is evaluated as a predicate."""
        parts = []
        if isinstance(where, Mapping) and not milvus_expressible(where):
            where = to_predicate(where)
        if category is not None:
            parts.append(f"category == {milvus_literal(category)}")
        if where is None:
            pass
        elif isinstance(where, str):
            if where.strip():
                parts.append(where)
        elif isinstance(where, Mapping):
            if where:
                parts.append(to_milvus_expression(where))
        elif callable(where):
            matching = self.metadata.ids_where(where)
            if len(matching) == 0:
                return None
            parts.append(_id_filter(matching))
        else:
            raise FashsimError(f"where must be a dict, a Milvus expression string or a callable, not {type(where)}")
        return " and ".join(f"({p})" for p in parts)

    def search_params(self, k: int) -> dict:
        params = {}
        if self._kind == "hnsw":
            params = {"ef": max(int(self._params["ef_search"]), k)}
        elif self._kind == "ivfpq":
            params = {"nprobe": int(self._params["nprobe"])}
        return {"metric_type": self._metric, "params": params}

    def search(
        self, queries: np.ndarray, k: int = 10, *, category: str | None = None, where=None, log: bool = False
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query, best first, optionally only of ``category`` and/or records that
        match ``where`` (see :mod:`fashsim.search.filters`)."""
        q = unit_vectors(queries, self._dim)
        if k <= 0:
            raise VectorIndexError(f"k must be positive, got {k}")
        if k > MAX_TOPK:
            raise VectorIndexError(f"Milvus returns at most {MAX_TOPK} results per query, not {k}")
        expr = self.filter_expression(category=category, where=where)
        if expr is None:
            results = [[] for _ in range(len(q))]
        else:
            results = []
            for start in range(0, len(q), MAX_NQ):
                answer = self._client.search(
                    self._name,
                    data=list(q[start : start + MAX_NQ]),
                    filter=expr,
                    limit=k,
                    output_fields=["source", "category", "extra"],
                    search_params=self.search_params(k),
                    anns_field="vector",
                )
                for row in answer:
                    hits = []
                    for rank, hit in enumerate(row, 1):
                        entity = hit["entity"]
                        hits.append(
                            Hit(
                                rank=rank,
                                id=int(hit["id"]),
                                score=float(hit["distance"]),
                                category=entity["category"],
                                source=entity["source"],
                                extra=dict(entity.get("extra") or {}),
                            )
                        )
                    results.append(hits)
        if log:
            for hits in results:
                self.metadata.log_search(k, category, [h.id for h in hits])
        return results

    # ------------------------------------------------------------ persistence
    def save(self, location=None, *, collection_name: str | None = None, token: str | None = None) -> str:
        """Persist. Without ``location`` (or with this collection's own): flush the writes (Milvus has
        them already). Elsewhere (a Lite path or a server URI): copy the collection there, replacing
        a collection of that name once the copy is complete. Returns the location written."""
        if location is None:
            self._client.flush(self._name)
            return self.location
        uri, name, is_lite = resolve_location(location, collection_name)
        if uri == self._uri and name == self._name:
            self._client.flush(self._name)
            return self.location
        same_db = uri == self._uri
        staging = f"{name}_staging_{time.time_ns()}"
        copy = MilvusCollection(
            self._dim,
            self._kind,
            location=location,
            collection_name=staging,
            model_fingerprint=self.model_fingerprint,
            metric=self._metric,
            token=token,
            client=self._client if same_db else None,
            **{k: v for k, v in self._params.items() if k in self.DEFAULT_PARAMS},
        )
        try:
            vectors, records = [], []
            for row in self._scan("", ["id", "vector", "source", "category", "extra"], batch_size=INSERT_BATCH):
                vectors.append(np.asarray(row["vector"], dtype=np.float32))
                records.append(
                    {
                        "id": int(row["id"]),
                        "source": row["source"],
                        "category": row["category"],
                        **(row.get("extra") or {}),
                    }
                )
                if len(records) == INSERT_BATCH:
                    copy.add(np.stack(vectors), records)
                    vectors, records = [], []
            if records:
                copy.add(np.stack(vectors), records)
            copy._rename(name)
            copy._client.flush(name)
            return copy.location
        except BaseException:
            copy._drop_quietly()
            raise
        finally:
            copy.close()

    def drop(self) -> None:
        """Delete the Milvus collection for good (and close)."""
        self._client.drop_collection(self._name)
        self.close()


def _cleanup(uri: str, is_lite: bool, client, owns_client: bool, tempdir: str | None, *, in_gc: bool = True) -> None:
    """Close and release (see :meth:`MilvusCollection.close`). Run by the garbage collector for a
    collection nobody closed, it works in a thread of its own: the collector may have interrupted this
    thread while it held a lock that releasing needs (at exit it runs at once: the process is ending)."""

    def work() -> None:
        try:
            _release(uri, is_lite, client, owns_client)
        finally:
            if tempdir is not None:
                shutil.rmtree(tempdir, ignore_errors=True)

    if in_gc and gc.isenabled():
        threading.Thread(target=work, name="fashsim-milvus-close", daemon=True).start()
    else:  # closed explicitly, or at interpreter exit (weakref.finalize runs with the collector off)
        work()
