"""What a route is: `Route` (one operation: method, path template, handler, right, documentation),
`Param`, and `Feature` (one part of the API: its routes and what it keeps on the app).

This module knows no part of the API. Each route module declares its own `FEATURE`; `api.app` is the
one place that lists the features, registers their routes (`api.router`) and builds the served OpenAPI
document (`api.openapi`) from the same table, so what is served and what is documented cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from tether.security.principal import Permission

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["IF_MATCH", "KEY", "KEY_CHOICES", "READ", "WRITE", "Body", "Feature", "Param", "Route", "Setup"]

READ = Permission.registry_read
WRITE = Permission.registry_write
Body = type[BaseModel] | Literal["ndjson", "object"] | None
Setup = Callable[[web.Application, "Hub"], None]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: Literal["query", "header"]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    permission: Permission | None  # None: public, no Authorization needed
    tag: str
    request: Body = None
    request_required: bool = True
    response: Body = None
    array: bool = False  # the response is a JSON array of `response`
    status: int = 200
    params: tuple[Param, ...] = ()
    response_headers: tuple[str, ...] = ()
    description: str = ""
    # The handler authenticates by itself (device credentials or "any principal"); `permission`
    # then only documents the right it checks.
    self_auth: bool = False
    # An Azure operation Tether does not implement yet: the handler answers 501 NotImplemented.
    not_yet: bool = False

    @property
    def extension(self) -> bool:
        """Tether-only routes live under /tether (plus the spec and health probe)."""
        return self.path.startswith("/tether") or self.permission is None


@dataclass(frozen=True, slots=True)
class Feature:
    """One part of the API: its route table and, optionally, what it keeps on the application
    (`setup(app, hub)` runs once in `build_app`, before the app starts)."""

    name: str
    routes: tuple[Route, ...]
    setup: Setup | None = None


IF_MATCH = Param("If-Match", "header", 'Etag, quoted (`"…"`) or not, or `*`.')
KEY_CHOICES = ("primary", "secondary", "both")
KEY = Param("key", "query", "Which key to regenerate.",
            {"type": "string", "enum": list(KEY_CHOICES), "default": "primary"})
