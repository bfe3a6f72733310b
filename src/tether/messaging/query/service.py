"""Run twin queries page by page with stable, opaque continuation tokens.

v1 strategy (a deliberate trade-off, see docs/decisions/0005-twins-and-query.md): twins are loaded in
device-id order, `SCAN_PAGE` devices per read, and filtered in Python. Cost is linear in the number of
devices scanned — fine up to ~100k devices — and the semantics (undefined values, JSON equality) are
exactly Azure's on both SQLite and PostgreSQL. The path to SQL pushdown: translate the WHERE tree to
JSON-path predicates (`json_extract` on SQLite, `jsonb` operators on PostgreSQL) for the common
shapes, keeping this evaluator as the final filter so results never change.

Collections (`FROM …`) are `Source`s: device twins and module twins (`devices.modules`) are built in;
others are given by their owners (`devices.jobs`: `JobService.query_source`). A sub-collection of
devices is scoped by its documents' device: a scoped caller sees the rows of the devices whose twin
matches a scope.

Paging: a plain query's token holds the key of the last returned document (a device id;
`FROM devices.modules`: (device id, module id); `FROM devices.jobs`: (job id, device id)), so the
next page resumes right after it in key order: every matching document that exists throughout the
paging is returned exactly once, even if others are added or removed in between. Aggregates are
computed whole for every page and sliced by offset. Tokens carry a hash of the query text; a token
used with another query is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.errors import BadRequest, NotFound
from tether.messaging.query.evaluator import Aggregation, matches, project
from tether.messaging.query.nodes import Query
from tether.messaging.query.parser import parse_query
from tether.messaging.query.rebase import rebase
from tether.messaging.query.scope import in_scope, narrowed
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


After = str | tuple[str, str]  # a document's key: a device id, or (device id, module id), (job id, device id)
Scanner = Callable[[After | None, int], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class Source:
    """A `FROM` collection: `scan(after, limit)` reads its documents in key order after a key (whose
    shape `run` has checked against `compound`), `key` names a document's key, `item_type` is the
    `x-ms-item-type` of `SELECT *` (None: "twin"), and `prefix` is the path its queries may put before
    a field (`devices.jobs.status` means `status`)."""

    scan: Scanner
    key: Callable[[dict[str, Any]], After]
    compound: bool = False  # keys are (a, b) pairs rather than one id
    item_type: str | None = None
    prefix: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Cursor:
    after: After | None = None  # plain queries: last identity returned
    offset: int = 0  # aggregates: rows already returned
    returned: int = 0  # items returned so far (for TOP)


def _query_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def encode_token(text: str, cursor: _Cursor) -> str:
    after = list(cursor.after) if isinstance(cursor.after, tuple) else cursor.after
    payload = {"v": 1, "q": _query_hash(text), "a": after, "o": cursor.offset, "n": cursor.returned}
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
    if isinstance(after, list) and len(after) == 2 and all(_is_id(a) for a in after):
        after = (after[0], after[1])
    if (
        payload.get("q") != _query_hash(text)
        or not (after is None or isinstance(after, tuple) or _is_id(after))
        or not isinstance(offset, int) or isinstance(offset, bool) or offset < 0
        or not isinstance(returned, int) or isinstance(returned, bool) or returned < 0
    ):
        raise bad
    return _Cursor(after, offset, returned)


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128


class QueryService:
    """`run(query text, max_items, continuation)` → one page of results."""

    def __init__(self, twins: TwinService, *, scan_page: int = SCAN_PAGE,
                 sources: Mapping[str, Source] | None = None) -> None:
        """`sources`: the collections other than device and module twins this service may read."""
        self._twins = twins
        self._scan_page = scan_page

        async def devices(after: After | None, limit: int) -> list[dict[str, Any]]:
            return await twins.scan(after=after if isinstance(after, str) else None, limit=limit)

        async def modules(after: After | None, limit: int) -> list[dict[str, Any]]:
            return await twins.scan_modules(after=after if isinstance(after, tuple) else None, limit=limit)

        self._sources: dict[str, Source] = {
            "devices": Source(devices, lambda doc: str(doc["deviceId"])),
            "devices.modules": Source(modules, lambda doc: (doc["deviceId"], doc["moduleId"]), compound=True),
            **(sources or {}),
        }

    async def run(self, text: str, *, max_items: int = DEFAULT_PAGE,
                  continuation: str | None = None, scopes: tuple[str, ...] | None = None) -> QueryPage:
        """`scopes`: only devices matching one of these conditions (a scoped operator's view; for
        `FROM devices.modules` or `devices.jobs`, the modules or job rows of such devices)."""
        query = parse_query(text)
        source = self._sources.get(query.source)
        if source is None:
            raise BadRequest(f"FROM {query.source} is not available here", field="query")
        query = rebase(query, source.prefix)
        device_scope: _DeviceScope | None = None
        if scopes and query.source == "devices":
            query = narrowed(query, scopes)
        elif scopes:
            device_scope = _DeviceScope(self._twins, scopes)
        if not 1 <= max_items <= MAX_PAGE:
            raise BadRequest(f"x-ms-max-item-count must be between 1 and {MAX_PAGE}",
                             field="x-ms-max-item-count")
        cursor = decode_token(text, continuation) if continuation else _Cursor()
        if cursor.after is not None and isinstance(cursor.after, tuple) != source.compound:
            raise BadRequest("x-ms-continuation is not a token from a previous page of this query",
                             field=TOKEN_FIELD)
        scan = _Scan(source, self._scan_page, device_scope)
        if query.aggregate:
            return await self._aggregate(text, query, max_items, cursor, scan)
        item_type = (source.item_type or query.item_type) if query.star else query.item_type
        return await self._select(text, query, max_items, cursor, scan, item_type)

    async def _select(self, text: str, query: Query, max_items: int, cursor: _Cursor, scan: _Scan,
                      item_type: str) -> QueryPage:
        remaining = None if query.top is None else query.top - cursor.returned
        if remaining is not None and remaining <= 0:
            return QueryPage([], item_type, None)
        limit = max_items if remaining is None else min(max_items, remaining)
        items: list[dict[str, Any]] = []
        last_id: After | None = None
        after = cursor.after
        while True:
            batch, following = await scan.next(after)
            for doc in batch:
                if not matches(query, doc):
                    continue
                if len(items) == limit:  # one more match exists: there is a next page
                    token = _Cursor(after=last_id, returned=cursor.returned + len(items))
                    return QueryPage(items, item_type, encode_token(text, token))
                items.append(project(query, doc))
                last_id = scan.source.key(doc)
                if remaining is not None and len(items) == remaining:
                    return QueryPage(items, item_type, None)
            if following is None:
                return QueryPage(items, item_type, None)
            after = following

    async def _aggregate(self, text: str, query: Query, max_items: int, cursor: _Cursor,
                         scan: _Scan) -> QueryPage:
        aggregation = Aggregation(query)
        after: After | None = None
        while True:
            batch, following = await scan.next(after)
            for doc in batch:
                if matches(query, doc):
                    aggregation.add(doc)
            if following is None:
                break
            after = following
        rows = aggregation.rows()
        if query.top is not None:
            rows = rows[: query.top]
        page = rows[cursor.offset : cursor.offset + max_items]
        end = cursor.offset + len(page)
        token = encode_token(text, _Cursor(offset=end)) if end < len(rows) else None
        return QueryPage(page, query.item_type, token)


@dataclass(frozen=True, slots=True)
class _Scan:
    """One run's reading of a source: pages of `page` documents, kept to the caller's devices."""

    source: Source
    page: int
    device_scope: _DeviceScope | None

    async def next(self, after: After | None) -> tuple[list[dict[str, Any]], After | None]:
        """(the next documents after `after` that the caller may see, where the scan goes on: None at
        the end)."""
        batch = await self.source.scan(after, self.page)
        following = self.source.key(batch[-1]) if len(batch) >= self.page else None
        if self.device_scope is not None:
            batch = await self.device_scope.keep(batch)
        return batch, following


class _DeviceScope:
    """A scoped caller's view of a sub-collection of devices (module twins, job rows): a document is
    in scope when its device's twin matches one of the scopes (the scopes speak about devices; a module
    twin's own tags do not widen them)."""

    def __init__(self, twins: TwinService, scopes: tuple[str, ...]) -> None:
        self._twins = twins
        self._scopes = scopes
        self._devices: dict[str, bool] = {}  # device id → in scope, for this query run

    async def keep(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for device_id in dict.fromkeys(d["deviceId"] for d in docs):
            if device_id not in self._devices:
                try:
                    twin = await self._twins.get(device_id)
                except NotFound:  # deleted meanwhile
                    self._devices[device_id] = False
                else:
                    self._devices[device_id] = in_scope(self._scopes, twin)
        return [d for d in docs if self._devices[d["deviceId"]]]


__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "After", "QueryPage", "QueryService", "Source"]
