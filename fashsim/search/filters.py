"""Metadata filters that mean the same on every vector store.

A search's ``where`` argument comes in three forms:

* a **dict** of conditions on record fields, all of which must hold (AND) — the portable form,
  understood by the FAISS collection (turned into a Python predicate, :func:`to_predicate`) and by
  the Milvus collection (turned into a Milvus filter expression, :func:`to_milvus_expression`)::

      {"colour": "Red"}                       # equality
      {"colour": ["Red", "Blue"]}             # a list or set: one of these values ("in")
      {"price": ("<", 50)}                    # a tuple (operator, value)
      {"price": [(">=", 10), ("<", 50)]}      # a list of such tuples: all of them
      {"category": "Bag", "price": ("<", 50)}

  Operators: ``==`` ``!=`` ``<`` ``<=`` ``>`` ``>=`` ``in`` ``not in``. ``id``, ``source`` and
  ``category`` are the record's own fields; any other name is one of its extra fields (Milvus keeps
  those in the JSON field ``extra``). A record that lacks the field, or holds a value that cannot be
  compared (a string against a number), does not match — on both stores. (One difference: Milvus
  takes a stored ``true`` for 1 and ``false`` for 0 in numeric comparisons; FAISS does not.)
* a **callable** ``predicate(record) -> bool`` over the record dict (``id``, ``source``,
  ``category`` and the extra fields): the FAISS collection's native form. The Milvus collection
  accepts it too, but has to read every record to evaluate it: a slow fallback for large collections.
* a **string**: a raw Milvus filter expression such as ``'extra["colour"] == "Red" and
  extra["price"] < 50'`` — Milvus only; the FAISS collection refuses it.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Mapping

from ..errors import FashsimError

CORE_FIELDS = ("id", "source", "category")
OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # JSON keys Milvus filters handle without quoting surprises
_COMPARE = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class FilterError(FashsimError):
    """A ``where`` filter that cannot be understood (unknown operator, bad field name or value)."""


def conditions(where: Mapping) -> list[tuple[str, str, object]]:
    """The dict form as a flat list of ``(field, operator, value)``; raises :class:`FilterError`."""
    if not isinstance(where, Mapping):
        raise FilterError(f"a where dict was expected, got {type(where).__name__}")
    out = []
    for field, spec in where.items():
        if not isinstance(field, str) or not field.strip():
            raise FilterError(f"filter field {field!r} must be a non-empty name")
        if isinstance(spec, tuple):
            specs = [spec]
        elif isinstance(spec, list) and spec and all(isinstance(s, tuple) for s in spec):
            specs = list(spec)
        elif isinstance(spec, (list, set, frozenset)):
            specs = [("in", spec)]
        else:
            specs = [("==", spec)]
        for item in specs:
            if len(item) != 2 or item[0] not in OPERATORS:
                raise FilterError(
                    f"filter on {field!r}: expected (operator, value) with an operator among "
                    f"{', '.join(OPERATORS)}, got {item!r}"
                )
            op, value = item
            if op in ("in", "not in"):
                if not isinstance(value, (list, tuple, set, frozenset)) or not value:
                    raise FilterError(f"filter on {field!r}: {op!r} needs a non-empty list of values")
                value = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
                for v in value:
                    _check_scalar(field, v)
            else:
                _check_scalar(field, value)
            out.append((field, op, value))
    return out


def _check_scalar(field: str, value) -> None:
    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
        return
    raise FilterError(f"filter on {field!r}: values must be strings, numbers or booleans, got {value!r}")


# ---------------------------------------------------------------- the command line's form
_CONDITION_TEXT = re.compile(r"^\s*([^<>=!]+?)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")


def _typed(text: str):
    """A condition's value as the catalog stores it: an integer, a number, else the text."""
    for parse in (int, float):
        try:
            value = parse(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text


def parse_conditions(texts, fields: Mapping[str, str] | None = None) -> dict | None:
    """The dict form from conditions written as text, e.g. ``["baseColour=Red", "price<50",
    "pattern!=Solid"]`` (the ``--where`` of the command line): ``=``/``==``, ``!=``, ``<``,
    ``<=``, ``>``, ``>=``; a value may be quoted (``baseColour="Navy Blue"``); comparisons are
    exact ("Red" is not "red"). None for no conditions; :class:`FilterError` for text it cannot
    read.

    ``fields`` (a collection's ``field_kinds()``: name → number | text | mixed) makes the reading
    exact: an unknown column is refused (the known ones are listed), a text column's value stays
    text (``size=8``, ``sku=0001``), a number column's must be a number, and ``<``/``>`` on a text
    column is refused. Without it, values that read as numbers are numbers."""
    if not texts:
        return None
    if isinstance(texts, str):
        texts = [texts]
    where: dict[str, list] = {}
    for text in texts:
        match = _CONDITION_TEXT.match(text)
        if not match:
            raise FilterError(f"cannot read the filter {text!r}: write COLUMN=VALUE, COLUMN!=VALUE or COLUMN<NUMBER")
        field, op, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # baseColour="Navy Blue"
            value = value[1:-1]
        kind = _field_kind(fields, field, text)
        value = value if kind == "text" else _typed(value)
        if kind == "number" and isinstance(value, str):
            raise FilterError(f"filter {text!r}: {field} holds numbers, {value!r} is not one")
        if op in ("<", "<=", ">", ">=") and (isinstance(value, str) or kind == "text"):
            raise FilterError(
                f"filter {text!r}: {op} needs a number"
                + (
                    f", and {field} holds text (a column with a value that is not a number stays text)"
                    if kind == "text"
                    else ""
                )
            )
        where.setdefault(field, []).append(("==" if op == "=" else op, value))
    conditions(where)  # field names and values checked now, not at the first search
    return where


def _field_kind(fields: Mapping[str, str] | None, field: str, text: str) -> str | None:
    if fields is None:
        return None
    if field not in fields:
        raise FilterError(f"filter {text!r}: no column {field!r}; the columns are: {', '.join(fields)}")
    return fields[field]


def describe(where) -> str:
    """A dict filter as one line of text, e.g. ``baseColour == Red & price < 50`` (``no filter``
    for None or an empty dict): for titles and logs."""
    if not where:
        return "no filter"
    if not isinstance(where, Mapping):
        return str(where)
    return " & ".join(
        f"{field} {op} {', '.join(map(str, value)) if isinstance(value, list) else value}"
        for field, op, value in conditions(where)
    )


# ---------------------------------------------------------------- Python (FAISS collection)
def _holds(record: Mapping, field: str, op: str, value) -> bool:
    if field not in record or record[field] is None:
        return False
    actual = record[field]
    try:
        if op == "in":
            return any(_equal(actual, v) for v in value)
        if op == "not in":
            return not any(_equal(actual, v) for v in value)
        if op in ("==", "!="):
            return _equal(actual, value) == (op == "==")
        if isinstance(actual, bool) != isinstance(value, bool) or isinstance(actual, str) != isinstance(value, str):
            return False  # no ordering across types (as in Milvus)
        return bool(_COMPARE[op](actual, value))
    except TypeError:
        return False


def _equal(a, b) -> bool:
    if isinstance(a, bool) != isinstance(b, bool) or isinstance(a, str) != isinstance(b, str):
        return False  # True is not 1, "1" is not 1
    return a == b


def to_predicate(where) -> Callable[[dict], bool] | None:
    """A Python predicate over records for any portable ``where`` (dict or callable); None stays None.
    A string (a Milvus expression) raises :class:`FilterError`."""
    if where is None or callable(where):
        return where
    if isinstance(where, str):
        raise FilterError(
            "a string filter is a Milvus expression and only works with the Milvus store: "
            "use a dict such as {'colour': 'Red', 'price': ('<', 50)} or a callable"
        )
    checks = conditions(where)
    return lambda record: all(_holds(record, field, op, value) for field, op, value in checks)


# ---------------------------------------------------------------- Milvus
def milvus_literal(value) -> str:
    """A value as a Milvus expression literal (strings double-quoted and escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return repr(float(value))
    raise FilterError(f"cannot write {value!r} into a Milvus filter")


def milvus_field(field: str) -> str:
    """The Milvus expression for a record field: a scalar column, or a key of the JSON ``extra``."""
    if field in CORE_FIELDS:
        return field
    if not _NAME.match(field):
        raise FilterError(f"filter field {field!r} must be a name of letters, digits and underscores")
    return f'extra["{field}"]'


def milvus_expressible(where: Mapping) -> bool:
    """Whether every field of a dict filter can be written in a Milvus expression (see :func:`milvus_field`)."""
    return all(field in CORE_FIELDS or _NAME.match(field) for field in where)


def to_milvus_expression(where: Mapping) -> str:
    """The dict form as one Milvus boolean expression (conditions joined with ``and``)."""
    parts = []
    for field, op, value in conditions(where):
        column = milvus_field(field)
        if op in ("in", "not in") and field in CORE_FIELDS:
            parts.append(f"{column} {op} [{', '.join(milvus_literal(v) for v in value)}]")
        elif op in ("in", "not in"):  # spelled out: Milvus Lite takes no JSON path left of `in`
            joiner, test = (" or ", "==") if op == "in" else (" and ", "!=")
            parts.append(joiner.join(f"{column} {test} {milvus_literal(v)}" for v in value))
        else:
            parts.append(f"{column} {op} {milvus_literal(value)}")
    return " and ".join(f"({p})" for p in parts)
