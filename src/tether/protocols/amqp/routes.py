"""Which handler serves a link: a table of address patterns, matched once per attach.

A route names the node's path pattern (matched case-insensitively against `addresses.node_path`; the
named groups, e.g. `device`, keep the client's case and are URL-decoded), the role the hub plays on
the link (RECEIVER: the client sends to the node), and the `LinkHandler` class serving it. The hub's
table is `DEFAULT_ROUTES`; the Event Hub-compatible endpoint adds its own routes to a table of its
own (`LinkTable((*DEFAULT_ROUTES, *EVENT_HUB_ROUTES))`) — nothing registers itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from .links import Link
from .performatives import Role

__all__ = ["HandlerFactory", "LinkRoute", "LinkTable", "RouteMatch"]


class HandlerFactory(Protocol):
    """A `LinkHandler` class: called with (endpoint, link, match)."""

    __name__: str

    def __call__(self, endpoint: Any, link: Link, match: RouteMatch, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class LinkRoute:
    pattern: str  # a regular expression over the whole node path
    role: Role  # the hub's role on the link
    handler: HandlerFactory
    name: str = ""  # for audit records and metrics (default: the handler's class name)

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.pattern, re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: LinkRoute
    params: Mapping[str, str]  # named groups, URL-decoded
    path: str

    @property
    def name(self) -> str:
        return self.route.name or self.route.handler.__name__


class LinkTable:
    """Routes in order; the first whose pattern and role fit wins."""

    def __init__(self, routes: Iterable[LinkRoute]) -> None:
        self.routes = tuple(routes)
        self._compiled = [(route, route.compiled()) for route in self.routes]

    def match(self, path: str, role: Role) -> RouteMatch | None:
        for route, pattern in self._compiled:
            if route.role is not role:
                continue
            found = pattern.fullmatch(path)
            if found is not None:
                params = {k: unquote(v) for k, v in found.groupdict().items() if v is not None}
                return RouteMatch(route, params, path)
        return None
