"""Evaluate parsed queries over twin documents (the JSON `TwinService` returns).

Semantics follow Azure IoT Hub (which follows Cosmos DB's SQL):
- a path that does not exist is *undefined*, not null; comparing with undefined, or comparing values
  of different JSON types, is undefined, and `WHERE` keeps a twin only when the condition is true —
  so `tags.x != 'a'` does not match twins without `tags.x`;
- `AND`/`OR`/`NOT` use three-valued logic (false AND undefined = false, true OR undefined = true,
  NOT undefined = undefined);
- numbers compare numerically (integers and floats alike), strings by code point; `<`/`>` on other
  types is undefined; equality is JSON equality (`true` is not `1`);
- a projected path that is undefined is left out of the result object.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from tether.messaging.query.nodes import (
    And,
    Compare,
    Condition,
    Count,
    Field,
    In,
    Literal,
    Not,
    Operand,
    Path,
    Query,
    Truth,
)
from tether.messaging.twin_docs import json_equal


class _Undefined:
    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "undefined"


UNDEFINED: Any = _Undefined()


def _kind(value: Any) -> str | None:
    if value is UNDEFINED:
        return None
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return None


def _both(kind: str, a: Any, b: Any) -> bool:
    return _kind(a) == kind and _kind(b) == kind


def _starts(a: Any, b: Any) -> Any:
    return a.startswith(b) if _both("string", a, b) else UNDEFINED


def _ends(a: Any, b: Any) -> Any:
    return a.endswith(b) if _both("string", a, b) else UNDEFINED


def _contains(a: Any, b: Any) -> Any:
    return (b in a) if _both("string", a, b) else UNDEFINED


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "IS_DEFINED": lambda v: v is not UNDEFINED,
    "IS_NULL": lambda v: v is None,
    "IS_STRING": lambda v: _kind(v) == "string",
    "IS_NUMBER": lambda v: _kind(v) == "number",
    "IS_BOOL": lambda v: _kind(v) == "bool",
    "IS_OBJECT": lambda v: _kind(v) == "object",
    "IS_ARRAY": lambda v: _kind(v) == "array",
    "IS_PRIMITIVE": lambda v: _kind(v) in ("null", "bool", "number", "string"),
    "STARTSWITH": _starts,
    "ENDSWITH": _ends,
    "CONTAINS": _contains,
}
FUNCTION_ARITY = {name: (2 if name in ("STARTSWITH", "ENDSWITH", "CONTAINS") else 1) for name in _FUNCTIONS}


def resolve(path: Path, doc: Any) -> Any:
    value = doc
    for segment in path.segments:
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        else:
            return UNDEFINED
    return value


def value_of(operand: Operand, doc: dict[str, Any]) -> Any:
    if isinstance(operand, Path):
        return resolve(operand, doc)
    if isinstance(operand, Literal):
        return operand.value
    return _FUNCTIONS[operand.name](*(value_of(a, doc) for a in operand.args))


def _compare(op: str, a: Any, b: Any) -> Any:
    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a is None or kind_b is None or kind_a != kind_b:
        return UNDEFINED
    if op == "=":
        return json_equal(a, b)
    if op == "!=":
        return not json_equal(a, b)
    if kind_a not in ("number", "string"):
        return UNDEFINED
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


def _member(value: Any, values: Iterable[Any]) -> Any:
    kind = _kind(value)
    if kind is None:
        return UNDEFINED
    return any(_kind(v) == kind and json_equal(value, v) for v in values)


def test(condition: Condition, doc: dict[str, Any]) -> Any:
    """True, False or UNDEFINED (recursion is bounded by the parser's nesting limit)."""
    if isinstance(condition, Compare):
        return _compare(condition.op, value_of(condition.left, doc), value_of(condition.right, doc))
    if isinstance(condition, In):
        found = _member(value_of(condition.operand, doc), condition.values)
        return found if found is UNDEFINED or not condition.negated else not found
    if isinstance(condition, Truth):
        value = value_of(condition.operand, doc)
        return value if isinstance(value, bool) else UNDEFINED
    if isinstance(condition, Not):
        inner = test(condition.condition, doc)
        return inner if inner is UNDEFINED else not inner
    if isinstance(condition, And):
        result: Any = True
        for part in condition.conditions:
            value = test(part, doc)
            if value is False:
                return False
            if value is UNDEFINED:
                result = UNDEFINED
        return result
    result = False
    for part in condition.conditions:
        value = test(part, doc)
        if value is True:
            return True
        if value is UNDEFINED:
            result = UNDEFINED
    return result


def matches(query: Query, doc: dict[str, Any]) -> bool:
    return query.where is None or test(query.where, doc) is True


def project(query: Query, doc: dict[str, Any]) -> dict[str, Any]:
    """One result item of a non-aggregate query: the twin itself for `SELECT *`."""
    if query.star:
        return doc
    out: dict[str, Any] = {}
    for item in query.items:
        if isinstance(item, Field):
            value = resolve(item.path, doc)
            if value is not UNDEFINED:
                out[item.name] = value
    return out


class Aggregation:
    """COUNT() with or without GROUP BY, fed one matching twin at a time."""

    def __init__(self, query: Query) -> None:
        self._query = query
        self._groups: dict[str, tuple[tuple[Any, ...], int]] = {}

    def add(self, doc: dict[str, Any]) -> None:
        values = tuple(resolve(p, doc) for p in self._query.group_by)
        key = json.dumps([[v is UNDEFINED, None if v is UNDEFINED else v] for v in values],
                         sort_keys=True, separators=(",", ":"))
        previous = self._groups.get(key)
        self._groups[key] = (values, 1 if previous is None else previous[1] + 1)

    def rows(self) -> list[dict[str, Any]]:
        """Result rows, ordered by group key (stable across pages). Without GROUP BY there is exactly
        one row, even when nothing matched (COUNT() = 0)."""
        if not self._query.group_by and not self._groups:
            self._groups["[]"] = ((), 0)
        rows: list[dict[str, Any]] = []
        for key in sorted(self._groups):
            values, count = self._groups[key]
            by_path = dict(zip((p.segments for p in self._query.group_by), values, strict=True))
            row: dict[str, Any] = {}
            for item in self._query.items:
                if isinstance(item, Count):
                    row[item.name] = count
                else:
                    value = by_path.get(item.path.segments, UNDEFINED)
                    if value is not UNDEFINED:
                        row[item.name] = value
            rows.append(row)
        return rows


__all__ = ["FUNCTION_ARITY", "UNDEFINED", "Aggregation", "matches", "project", "resolve", "test", "value_of"]
