"""Queries over a sub-collection name its fields with the collection's path (`FROM devices.jobs WHERE
devices.jobs.status = 'completed'`); `rebase` strips that prefix so the evaluator reads the
collection's own documents (`status`)."""

from __future__ import annotations

import dataclasses

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

__all__ = ["rebase"]


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

