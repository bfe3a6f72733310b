"""Device scopes: a query condition (`tags.site = 'plant-1'`) that limits an operator's role to the
devices whose twin matches it. The condition is the WHERE part of Azure's query language, parsed by
the same parser and evaluated by the same evaluator as `POST /devices/query`, so a scope means exactly
what the same WHERE clause means in a query."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tether.errors import BadRequest
from tether.messaging.query.evaluator import test
from tether.messaging.query.nodes import And, Condition, Or, Query
from tether.messaging.query.parser import parse_query

__all__ = ["in_scope", "narrowed", "scope_condition", "validate_scope"]


@lru_cache(maxsize=256)
def scope_condition(text: str) -> Condition:
    """The parsed condition; BadRequest(field="scope") when it is not a plain WHERE condition."""
    try:
        query = parse_query(f"SELECT * FROM devices WHERE {text}")  # noqa: S608 (our own parser)
    except BadRequest as exc:
        raise BadRequest(f"scope is not a query condition: {exc.message}", field="scope") from None
    if query.where is None or query.group_by or query.top is not None:
        raise BadRequest("scope must be a condition such as tags.site = 'plant-1'", field="scope")
    return query.where


def validate_scope(text: str) -> None:
    scope_condition(text)


def in_scope(scopes: tuple[str, ...], twin: dict[str, Any]) -> bool:
    """True when the twin matches at least one of the scopes."""
    return any(test(scope_condition(s), twin) is True for s in scopes)


def narrowed(query: Query, scopes: tuple[str, ...]) -> Query:
    """`query` restricted to devices in one of `scopes` (its WHERE and the scope both hold)."""
    scope: Condition = scope_condition(scopes[0]) if len(scopes) == 1 else \
        Or(tuple(scope_condition(s) for s in scopes))
    where: Condition = scope if query.where is None else And((scope, query.where))
    return Query(star=query.star, items=query.items, top=query.top, where=where, group_by=query.group_by,
                 source=query.source)
