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
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tether.errors import BadRequest
from tether.messaging.query.evaluator import Aggregation, matches, project
from tether.messaging.query.nodes import Query
from tether.messaging.query.parser import parse_query
from tether.messaging.query.scope import narrowed
from tether.messaging.twins import TwinService

DEFAULT_PAGE = 100
MAX_PAGE = 1000
SCAN_PAGE = 500
TOKEN_FIELD = "x-ms-continuation"


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
        or not (after is None or (isinstance(after, str) and 0 < len(after) <= 128))
        or not isinstance(offset, int) or isinstance(offset, bool) or offset < 0
        or not isinstance(returned, int) or isinstance(returned, bool) or returned < 0
    ):
        raise bad
    return _Cursor(after, offset, returned)


class QueryService:
    """`run(query text, max_items, continuation)` → one page of results."""

    def __init__(self, twins: TwinService, *, scan_page: int = SCAN_PAGE) -> None:
        self._twins = twins
        self._scan_page = scan_page

    async def run(self, text: str, *, max_items: int = DEFAULT_PAGE,
                  continuation: str | None = None, scopes: tuple[str, ...] | None = None) -> QueryPage:
        """`scopes`: only devices matching one of these conditions (a scoped operator's view)."""
        query = parse_query(text)
        if scopes:
            query = narrowed(query, scopes)
        if not 1 <= max_items <= MAX_PAGE:
            raise BadRequest(f"x-ms-max-item-count must be between 1 and {MAX_PAGE}",
                             field="x-ms-max-item-count")
        cursor = decode_token(text, continuation) if continuation else _Cursor()
        if query.aggregate:
            return await self._aggregate(text, query, max_items, cursor)
        return await self._select(text, query, max_items, cursor)

    async def _select(self, text: str, query: Query, max_items: int, cursor: _Cursor) -> QueryPage:
        remaining = None if query.top is None else query.top - cursor.returned
        if remaining is not None and remaining <= 0:
            return QueryPage([], query.item_type, None)
        limit = max_items if remaining is None else min(max_items, remaining)
        items: list[dict[str, Any]] = []
        last_id: str | None = None
        after = cursor.after
        while True:
            batch = await self._twins.scan(after=after, limit=self._scan_page)
            for doc in batch:
                if not matches(query, doc):
                    continue
                if len(items) == limit:  # one more match exists: there is a next page
                    token = _Cursor(after=last_id, returned=cursor.returned + len(items))
                    return QueryPage(items, query.item_type, encode_token(text, token))
                items.append(project(query, doc))
                last_id = doc["deviceId"]
                if remaining is not None and len(items) == remaining:
                    return QueryPage(items, query.item_type, None)
            if len(batch) < self._scan_page:
                return QueryPage(items, query.item_type, None)
            after = batch[-1]["deviceId"]

    async def _aggregate(self, text: str, query: Query, max_items: int, cursor: _Cursor) -> QueryPage:
        aggregation = Aggregation(query)
        after: str | None = None
        while True:
            batch = await self._twins.scan(after=after, limit=self._scan_page)
            for doc in batch:
                if matches(query, doc):
                    aggregation.add(doc)
            if len(batch) < self._scan_page:
                break
            after = batch[-1]["deviceId"]
        rows = aggregation.rows()
        if query.top is not None:
            rows = rows[: query.top]
        page = rows[cursor.offset : cursor.offset + max_items]
        end = cursor.offset + len(page)
        token = encode_token(text, _Cursor(offset=end)) if end < len(rows) else None
        return QueryPage(page, query.item_type, token)


__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "QueryPage", "QueryService"]
