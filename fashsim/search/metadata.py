"""Item metadata in SQLite: what each vector id in the index stands for, plus a search history.

Tables:

* ``items(id INTEGER PRIMARY KEY, source TEXT, category TEXT, extra TEXT)`` — ``source`` is an
  image path or a dataset reference such as ``fashion-mnist:test:123``; ``extra`` is a JSON
  object with any further fields (colour, price, item id ...).
* ``search_history(id, at, k, category, result_ids)`` — optional log of searches.

The database lives in memory while in use (fast, and the saved copy stays untouched until the
next save); :meth:`MetadataStore.save` writes it to a file with SQLite's backup API.

A store may be used from any thread (a Jupyter kernel runs widget callbacks on another thread
than the one that loaded the collection): the one in-memory connection is opened with
``check_same_thread=False`` and every use of it holds the store's re-entrant lock, so calls from
several threads run one at a time and each sees a consistent database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import FashsimError

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    category TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS items_category ON items(category);
CREATE TABLE IF NOT EXISTS search_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    k INTEGER NOT NULL,
    category TEXT,
    result_ids TEXT NOT NULL
);
"""

CORE_FIELDS = ("id", "source", "category")


class MetadataError(FashsimError):
    """Inconsistent catalog operations (duplicate or unknown ids, missing fields)."""


def _plain_value(value):
    """``json.dumps``'s fallback: numpy scalars (what a pandas row holds) as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not a JSON value")


def record_row(record: Mapping) -> tuple[int, str, str, str]:
    """A record as both stores keep it: ``(id, source, category, extra)``, ``extra`` being the
    JSON object of its other fields — numbers, text, booleans, None and lists or dicts of them;
    numpy scalars (what a pandas row holds) become Python numbers. A record without a field of
    :data:`CORE_FIELDS`, or with another kind of value, is refused with a :class:`MetadataError`."""
    missing = [f for f in CORE_FIELDS if f not in record]
    if missing:
        raise MetadataError(f"record {dict(record)!r} lacks {', '.join(missing)}")
    extra = {k: v for k, v in record.items() if k not in CORE_FIELDS}
    try:
        extra_json = json.dumps(extra, default=_plain_value)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"record {record['id']!r}: extra fields must be JSON values ({exc})") from None
    return int(record["id"]), str(record["source"]), str(record["category"]), extra_json


class MetadataStore:
    """The metadata catalog (see the module docstring)."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.lock = threading.RLock()  # held for every use of ``conn`` (see the module docstring)
        with self.lock:
            self.conn.executescript(SCHEMA)

    def _query(self, sql: str, params=()) -> list[tuple]:
        """All rows of a read-only query, fetched while holding the lock (no cursor outlives it)."""
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------ items
    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM items")[0][0]

    def add(self, records: Iterable[Mapping]) -> np.ndarray:
        """Insert records (dicts with ``id``, ``source``, ``category`` and any extra fields) in
        one transaction; returns their ids. Duplicate ids raise and insert nothing."""
        rows = [record_row(record) for record in records]
        try:
            with self.lock, self.conn:
                self.conn.executemany("INSERT INTO items (id, source, category, extra) VALUES (?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            ids = [r[0] for r in rows]
            taken = self.existing(ids)
            raise MetadataError(
                f"{len(taken)} ids already exist in the catalog (e.g. {taken[:5].tolist()})"
                if len(taken)
                else "the records repeat an id"
            ) from None
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def remove(self, ids) -> int:
        """Delete ids; returns how many existed."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        with self.lock, self.conn:
            cursor = self.conn.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in ids])
            return cursor.rowcount

    def existing(self, ids) -> np.ndarray:
        """Which of ``ids`` are in the catalog."""
        wanted = np.asarray(ids, dtype=np.int64).ravel()
        return np.intersect1d(wanted, self.ids())

    def get(self, ids) -> list[dict | None]:
        """Records of ``ids`` in the same order (None where an id is unknown)."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        found: dict[int, dict] = {}
        with self.lock:  # all chunks from one state of the catalog
            for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
                chunk = ids[start : start + 900]
                marks = ",".join("?" * len(chunk))
                for row in self._query(f"SELECT id, source, category, extra FROM items WHERE id IN ({marks})", chunk):
                    found[row[0]] = {"id": row[0], "source": row[1], "category": row[2], **json.loads(row[3])}
        return [found.get(i) for i in ids]

    def ids(self, category: str | None = None) -> np.ndarray:
        """All ids, or those of one category, sorted."""
        if category is None:
            rows = self._query("SELECT id FROM items ORDER BY id")
        else:
            rows = self._query("SELECT id FROM items WHERE category = ? ORDER BY id", (category,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def ids_where(self, predicate: Callable[[dict], bool]) -> np.ndarray:
        """Ids of the records for which ``predicate(record)`` is true (any metadata field)."""
        rows = self._query("SELECT id, source, category, extra FROM items ORDER BY id")
        return np.fromiter(
            (r[0] for r in rows if predicate({"id": r[0], "source": r[1], "category": r[2], **json.loads(r[3])})),
            dtype=np.int64,
        )

    def categories(self) -> dict[str, int]:
        """Category → number of items, sorted by name."""
        return dict(self._query("SELECT category, COUNT(*) FROM items GROUP BY category ORDER BY category"))

    def field_values(self, max_distinct: int = 12) -> dict[str, list]:
        """The further (``extra``) fields with at most ``max_distinct`` distinct values, each with
        its sorted values: what a filter can offer (e.g. ``{"colour": ["blue", "red"]}``). Fields
        holding lists, objects or more values (names, prices, item ids ...) are left out."""
        with self.lock:
            try:
                counts = self.conn.execute(
                    "SELECT j.key, COUNT(DISTINCT j.value), SUM(j.type IN ('object', 'array')) "
                    "FROM items, json_each(items.extra) AS j GROUP BY j.key ORDER BY j.key"
                ).fetchall()
                chosen = {
                    key: [
                        {"true": True, "false": False}.get(kind, value)
                        for kind, value in self.conn.execute(
                            "SELECT DISTINCT j.type, j.value FROM items, json_each(items.extra) AS j "
                            "WHERE j.key = ? AND j.type != 'null'",
                            (key,),
                        )
                    ]
                    for key, distinct, nested in counts
                    if 0 < distinct <= max_distinct and not nested
                }
            except sqlite3.OperationalError:  # an SQLite without JSON functions: read the records
                extras = (json.loads(extra) for (extra,) in self.conn.execute("SELECT DISTINCT extra FROM items"))
                return few_valued_fields(extras, max_distinct)
        return {key: sorted(vals, key=lambda v: (str(type(v)), v)) for key, vals in chosen.items() if vals}

    def field_kinds(self) -> dict[str, str]:
        """Every field a filter can name → ``"number"``, ``"text"`` or ``"mixed"`` (what its values
        are), the record's own ``id``, ``source`` and ``category`` first; see :func:`field_kinds`."""
        with self.lock:
            extras = (json.loads(extra) for (extra,) in self.conn.execute("SELECT extra FROM items"))
            return field_kinds(extras)

    # ------------------------------------------------------------ history
    def log_search(self, k: int, category: str | None, result_ids) -> None:
        """Append one search (when, k, category filter, result ids) to the search history."""
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT INTO search_history (at, k, category, result_ids) VALUES (?, ?, ?, ?)",
                (time.time(), int(k), category, json.dumps([int(i) for i in result_ids])),
            )

    def history(self, limit: int = 20) -> list[dict]:
        """The latest searches, newest first."""
        rows = self._query("SELECT at, k, category, result_ids FROM search_history ORDER BY id DESC LIMIT ?", (limit,))
        return [{"at": at, "k": k, "category": c, "result_ids": json.loads(r)} for at, k, c, r in rows]

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the whole database to ``path`` (a new file)."""
        target = sqlite3.connect(str(path))
        try:
            with self.lock:
                self.conn.backup(target)
        finally:
            target.close()

    @classmethod
    def load(cls, path: str | Path) -> MetadataStore:
        """Read a database file written by :meth:`save` into memory."""
        path = Path(path)
        if not path.is_file():
            raise MetadataError(f"catalog database {path} does not exist")
        db = cls()
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            with db.lock:
                source.backup(db.conn)
            db._query("SELECT id, source, category, extra FROM items LIMIT 1")
        except sqlite3.DatabaseError as exc:
            raise MetadataError(f"{path} is not a readable fashsim catalog ({exc})") from None
        finally:
            source.close()
        return db


def few_valued_fields(extras: Iterable[Mapping], max_distinct: int) -> dict[str, list]:
    """Of the ``extra`` fields of some records, those with at most ``max_distinct`` distinct scalar
    values, each with its sorted values (fields holding lists or objects are left out)."""
    values: dict[str, set] = {}
    nested: set[str] = set()
    for extra in extras:
        for key, value in extra.items():
            if isinstance(value, (list, dict)):
                nested.add(key)
            elif value is not None:
                values.setdefault(key, set()).add(value)
    chosen = {k: v for k, v in values.items() if k not in nested and 0 < len(v) <= max_distinct}
    return {k: sorted(v, key=lambda x: (str(type(x)), x)) for k, v in sorted(chosen.items())}


def field_kinds(extras: Iterable[Mapping]) -> dict[str, str]:
    """``id``, ``source``, ``category`` and each ``extra`` field → ``"number"`` (every value a
    number), ``"text"`` (every value text) or ``"mixed"``: how the command line's ``--where``
    reads a condition's value (:func:`fashsim.search.filters.parse_conditions`)."""
    seen: dict[str, set] = {}
    for extra in extras:
        for key, value in extra.items():
            if value is not None:
                seen.setdefault(key, set()).add(_kind(value))
    kinds = {"id": "number", "source": "text", "category": "text"}
    # a field whose values are all text, or all numbers, has that kind; anything else is mixed
    kinds.update(
        (key, found.pop() if found in ({"text"}, {"number"}) else "mixed") for key, found in sorted(seen.items())
    )
    return kinds


def _kind(value) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return "other"
