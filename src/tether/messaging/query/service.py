"""Run twin queries page by page with stable, opaque continuation tokens.

v1 strategy (a deliberate trade-off, see docs/decisions/0005-twins-and-query.md): twins are loaded in
device-id order, `SCAN_PAGE` devices per read, and filtered in Python. Cost is linear in the number of
devices scanned — fine up to ~100k devices — and the semantics (undefined values, JSON equality) are
exactly Azure's on both SQLite and PostgreSQL. The path to SQL pushdown: translate the WHERE tree to
JSON-path predicates (`json_extract` on SQLite, `jsonb` operators on PostgreSQL) for the common
shapes, keeping this evaluator as the final filter so results never change.

Paging: a plain query's token holds the last returned device id, so the next page resumes right after
it in id order: every matching device that exists throughout the paging is returned exactly once,
even if others are added or removed in between. Aggregates are computed whole for every page and
sliced by offset. Tokens carry a hash of the query text; a token used with another query is refused.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.errors import BadRequest
from tether.messaging.query.evaluator import Aggregation, matches, project
from tether.messaging.query.nodes import (
    And,
    Call,
    Compare,
    Condition,
    Field,
    In,
    Not,
    Operand,
    Or,
    Path,
    Query,
    Truth,
)
from tether.messaging.query.parser import parse_query
from tether.messaging.twins import TwinService

DEFAULT_PAGE = 100
MAX_PAGE = 1000
SCAN_PAGE = 500
TOKEN_FIELD = "x-ms-continuation"


Scanner = Callable[[str | None, int], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class Source:
    """A `FROM` collection other than `devices`: documents in key order after a key, the key of a
    document, the `x-ms-item-type` of `SELECT *`, and the path prefix its queries may use
    (`devices.jobs.status` means `status`)."""

    scan: Scanner
    key: Callable[[dict[str, Any]], str]
    item_type: str
    prefix: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QueryPage:
    items: list[dict[str, Any]]
    item_type: str  # x-ms-item-type: "twin" or "raw"
    continuation: str | None  # None: this was the last page


@dataclass(frozen=True, slots=True)
class _Cursor:
    after: str | None = None  # plain queries: last device id returned
    offset: int = 0  # aggregates: rows already returned
    returned: int = 0  # items returned so far (for TOP)


def _query_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def encode_token(text: str, cursor: _Cursor) -> str:
    payload = {"v": 1, "q": _query_hash(text), "a": cursor.after, "o": cursor.offset, "n": cursor.returned}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_token(text: str, token: str) -> _Cursor:
    bad = BadRequest("x-ms-continuation is not a token from a previous page of this query",
                     field=TOKEN_FIELD)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise bad from None
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise bad
    after, offset, returned = payload.get("a"), payload.get("o"), payload.get("n")
    if (
        payload.get("q") != _query_hash(text)
        or not (after is None or (isinstance(after, str) and 0 < len(after) <= 260))
        or not isinstance(offset, int) or isinstance(offset, bool) or offset < 0
        or not isinstance(returned, int) or isinstance(returned, bool) or returned < 0
    ):
        raise bad
    return _Cursor(after, offset, returned)


class QueryService:
    """`run(query text, max_items, continuation)` → one page of results."""

    def __init__(self, twins: TwinService, *, scan_page: int = SCAN_PAGE,
                 sources: Mapping[str, Source] | None = None) -> None:
        self._twins = twins
        self._scan_page = scan_page
        self._sources = dict(sources or {})
        self._scan: Scanner = self._scan_twins
        self._key: Callable[[dict[str, Any]], str] = _device_key
        self._item_type: str | None = None

    async def _scan_twins(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        return await self._twins.scan(after=after, limit=limit)

    async def run(self, text: str, *, max_items: int = DEFAULT_PAGE,
                  continuation: str | None = None) -> QueryPage:
        query = parse_query(text)
        if not 1 <= max_items <= MAX_PAGE:
            raise BadRequest(f"x-ms-max-item-count must be between 1 and {MAX_PAGE}",
                             field="x-ms-max-item-count")
        cursor = decode_token(text, continuation) if continuation else _Cursor()
        if query.source != "devices":
            source = self._sources.get(query.source)
            if source is None:
                raise BadRequest(f"FROM {query.source} is not available here", field="query")
            self._scan, self._key = source.scan, source.key
            self._item_type = source.item_type if query.star else None
            query = rebase(query, source.prefix)
        if query.aggregate:
            return await self._aggregate(text, query, max_items, cursor)
        return await self._select(text, query, max_items, cursor)

    async def _select(self, text: str, query: Query, max_items: int, cursor: _Cursor) -> QueryPage:
        remaining = None if query.top is None else query.top - cursor.returned
        item_type = self._item_type or query.item_type
        if remaining is not None and remaining <= 0:
            return QueryPage([], item_type, None)
        limit = max_items if remaining is None else min(max_items, remaining)
        items: list[dict[str, Any]] = []
        last_id: str | None = None
        after = cursor.after
        while True:
            batch = await self._scan(after, self._scan_page)
            for doc in batch:
                if not matches(query, doc):
                    continue
                if len(items) == limit:  # one more match exists: there is a next page
                    token = _Cursor(after=last_id, returned=cursor.returned + len(items))
                    return QueryPage(items, item_type, encode_token(text, token))
                items.append(project(query, doc))
                last_id = self._key(doc)
                if remaining is not None and len(items) == remaining:
                    return QueryPage(items, item_type, None)
            if len(batch) < self._scan_page:
                return QueryPage(items, item_type, None)
            after = self._key(batch[-1])

    async def _aggregate(self, text: str, query: Query, max_items: int, cursor: _Cursor) -> QueryPage:
        aggregation = Aggregation(query)
        after: str | None = None
        while True:
            batch = await self._scan(after, self._scan_page)
            for doc in batch:
                if matches(query, doc):
                    aggregation.add(doc)
            if len(batch) < self._scan_page:
                break
            after = self._key(batch[-1])
        rows = aggregation.rows()
        if query.top is not None:
            rows = rows[: query.top]
        page = rows[cursor.offset : cursor.offset + max_items]
        end = cursor.offset + len(page)
        token = encode_token(text, _Cursor(offset=end)) if end < len(rows) else None
        return QueryPage(page, query.item_type, token)


def _device_key(doc: dict[str, Any]) -> str:
    return str(doc["deviceId"])


def _rebase_path(path: Path, prefix: tuple[str, ...]) -> Path:
    n = len(prefix)
    if n and path.segments[:n] == prefix and len(path.segments) > n:
        return Path(path.segments[n:])
    return path


def _rebase_operand(operand: Operand, prefix: tuple[str, ...]) -> Operand:
    if isinstance(operand, Path):
        return _rebase_path(operand, prefix)
    if isinstance(operand, Call):
        return Call(operand.name, tuple(_rebase_operand(a, prefix) for a in operand.args))
    return operand


def _rebase_condition(condition: Condition, prefix: tuple[str, ...]) -> Condition:
    if isinstance(condition, Compare):
        return Compare(condition.op, _rebase_operand(condition.left, prefix),
                       _rebase_operand(condition.right, prefix))
    if isinstance(condition, In):
        return In(_rebase_operand(condition.operand, prefix), condition.values, condition.negated)
    if isinstance(condition, Truth):
        return Truth(_rebase_operand(condition.operand, prefix))
    if isinstance(condition, Not):
        return Not(_rebase_condition(condition.condition, prefix))
    parts = tuple(_rebase_condition(c, prefix) for c in condition.conditions)
    return And(parts) if isinstance(condition, And) else Or(parts)


def rebase(query: Query, prefix: tuple[str, ...]) -> Query:
    """The query with `prefix.` removed from its paths (`devices.jobs.status` → `status`); the
    nesting is bounded by the parser, so the recursion is too."""
    if not prefix:
        return query
    items = tuple(Field(_rebase_path(i.path, prefix), i.name) if isinstance(i, Field) else i
                  for i in query.items)
    where = None if query.where is None else _rebase_condition(query.where, prefix)
    return dataclasses.replace(query, items=items, where=where,
                               group_by=tuple(_rebase_path(p, prefix) for p in query.group_by))


__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "QueryPage", "QueryService", "Source", "rebase"]
