"""The parsed form of a query: small immutable nodes the evaluator walks (no lark types leak out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Path:
    """A property path into the twin document: `tags.location.region` → ("tags", "location", "region")."""

    segments: tuple[str, ...]

    @property
    def text(self) -> str:
        return ".".join(self.segments)


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any  # str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Call:
    """A built-in function call, e.g. IS_DEFINED(tags.x); `name` is upper-case."""

    name: str
    args: tuple[Operand, ...]


Operand = Path | Literal | Call


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # one of = != < <= > >=  (`<>` is normalised to `!=`)
    left: Operand
    right: Operand


@dataclass(frozen=True, slots=True)
class In:
    operand: Operand
    values: tuple[Any, ...]
    negated: bool  # NIN


@dataclass(frozen=True, slots=True)
class Truth:
    """A bare operand used as a condition: true only when it evaluates to boolean true."""

    operand: Operand


@dataclass(frozen=True, slots=True)
class Not:
    condition: Condition


@dataclass(frozen=True, slots=True)
class And:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Or:
    conditions: tuple[Condition, ...]


Condition = Compare | In | Truth | Not | And | Or


@dataclass(frozen=True, slots=True)
class Field:
    """A projected property; `name` is the alias or the path's last segment."""

    path: Path
    name: str


@dataclass(frozen=True, slots=True)
class Count:
    name: str


SelectItem = Field | Count


@dataclass(frozen=True, slots=True)
class Query:
    """`SELECT [TOP n] (* | items) FROM devices|devices.modules [WHERE condition] [GROUP BY paths]`."""

    star: bool
    items: tuple[SelectItem, ...]
    top: int | None
    where: Condition | None
    group_by: tuple[Path, ...]
    source: str = "devices"  # FROM devices | devices.modules (module twins) | devices.jobs (job rows)

    @property
    def aggregate(self) -> bool:
        return bool(self.group_by) or any(isinstance(item, Count) for item in self.items)

    @property
    def item_type(self) -> str:
        """`x-ms-item-type`: whole twins for `SELECT *`, raw JSON objects otherwise."""
        return "twin" if self.star else "raw"


__all__ = [
    "And",
    "Call",
    "Compare",
    "Condition",
    "Count",
    "Field",
    "In",
    "Literal",
    "Not",
    "Operand",
    "Or",
    "Path",
    "Query",
    "SelectItem",
    "Truth",
]
