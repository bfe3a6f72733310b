"""Which devices a condition selects: jobs' `queryCondition` and configurations' `targetCondition`
are WHERE clauses of the twin query language (`*` or empty: every device)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tether.errors import BadRequest
from tether.messaging.query import Query, parse_query
from tether.messaging.query.evaluator import matches
from tether.messaging.twins import TwinService

__all__ = ["matching_twins", "parse_condition"]

SCAN_PAGE = 500


def parse_condition(condition: str, *, field: str = "queryCondition") -> Query:
    text = condition.strip()
    if text in ("", "*"):
        return parse_query("SELECT * FROM devices")
    if text.lower().startswith("select "):
        raise BadRequest(f"{field} is a condition (the WHERE clause), not a whole query", field=field)
    try:
        return parse_query(f"SELECT * FROM devices WHERE {text}")  # noqa: S608 (the twin query grammar, not SQL)
    except BadRequest as exc:
        raise BadRequest(f"{field}: {exc.message}", field=field) from None


async def matching_twins(twins: TwinService, query: Query) -> AsyncIterator[dict[str, Any]]:
    """Every twin the query's WHERE selects, in device-id order."""
    after: str | None = None
    while True:
        batch = await twins.scan(after=after, limit=SCAN_PAGE)
        for doc in batch:
            if matches(query, doc):
                yield doc
        if len(batch) < SCAN_PAGE:
            return
        after = batch[-1]["deviceId"]
