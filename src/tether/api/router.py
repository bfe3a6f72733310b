"""Route matching as Azure IoT Hub does it: the one place that decides which route a path names.

Azure's gateway matches the literal segments of a path case-insensitively and tolerates a trailing
slash, and the SDKs rely on both: `GET /devices/` lists devices, the HTTP transports receive C2D
messages from `/devices/{id}/messages/devicebound` (lower case) and abandon them with
`POST …/devicebound/{lockToken}/abandon`. Path parameters (device ids, lock tokens) keep their case.

`RouteTable` is one aiohttp resource holding every route of the table; aiohttp's router indexes
resources by their literal prefix (case-sensitively), so the table registers under `/`, which every
request reaches, and does the matching itself: templates are tried most-literal first (`/devices/query`
before `/devices/{id}`), the first template whose path and method match wins, and a path that matches
only with other methods is 405 with `Allow`, as aiohttp answers for its own resources.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

__all__ = ["RouteTable", "TemplateResource", "canonical_path"]

_PARAM = re.compile(r"^\{(\w+)\}$")


def _unquote_safe(value: str) -> str:
    """`path_safe` keeps `%2F` and `%25` encoded so that they cannot split segments; undo that
    inside a parameter value (as aiohttp's own dynamic resources do)."""
    if "%" not in value:
        return value
    return re.sub("%2[fF]", "/", value).replace("%25", "%")


class TemplateResource(web.DynamicResource):
    """One path template (`/devices/{id}/messages/deviceBound`) with Azure's matching rules.

    Not registered in the router by itself: `RouteTable` asks it. `canonical` stays the template
    (the OpenAPI document and `app.router.routes()` show it)."""

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self.template = template
        segments = template.strip("/").split("/") if template.strip("/") else []
        pattern = []
        rank = []
        for segment in segments:
            param = _PARAM.match(segment)
            if param is not None:
                pattern.append(f"/(?P<{param.group(1)}>[^/]+)")
                rank.append(1)
            else:
                pattern.append("/" + "".join(_literal(c) for c in segment))
                rank.append(0)
        self._azure_pattern = re.compile("".join(pattern) + "/?" if pattern else "/")
        self.rank = tuple(rank)  # literal segments sort before parameters, position by position
        self.by_method: dict[str, web.ResourceRoute] = {}

    def add_azure_route(self, method: str, handler: Handler) -> None:
        self.by_method[method] = self.add_route(method, handler)

    def match_path(self, path: str) -> dict[str, str] | None:
        match = self._azure_pattern.fullmatch(path)
        if match is None:
            return None
        return {key: _unquote_safe(value) for key, value in match.groupdict().items()}

    def _match(self, path: str) -> dict[str, str] | None:
        return self.match_path(path)


def _literal(char: str) -> str:
    """A literal path character matching both cases (an ASCII letter) or exactly itself."""
    if char.isascii() and char.isalpha():
        return f"[{char.lower()}{char.upper()}]"
    return re.escape(char)


class RouteTable(web.AbstractResource):
    """Every route of the API as one resource (see the module docstring)."""

    def __init__(self, routes: Iterable[tuple[str, str, Handler]]) -> None:
        super().__init__()
        by_template: dict[str, TemplateResource] = {}
        for method, template, handler in routes:
            resource = by_template.get(template)
            if resource is None:
                resource = by_template[template] = TemplateResource(template)
            resource.add_azure_route(method, handler)
        # sorted() is stable: templates of equal rank keep the table's order
        self._resources = sorted(by_template.values(), key=lambda r: r.rank)
        # Candidates by (first segment in lower case, number of segments), so a request tries one or
        # two templates, not all; templates starting with a parameter (none today) are tried for
        # every path of their length.
        self._candidates: dict[tuple[str, int], list[TemplateResource]] = {}
        for resource in self._resources:
            segments = resource.template.strip("/").split("/")
            first = "" if _PARAM.match(segments[0]) else segments[0].lower()
            self._candidates.setdefault((first, len(segments)), []).append(resource)

    @property
    def canonical(self) -> str:
        return "/"  # indexed at the root: every request path reaches it

    def url_for(self, **kwargs: str) -> URL:
        raise NotImplementedError("use the route's own resource: route.resource.url_for()")

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("the route table is not mounted under a prefix")

    def get_info(self) -> dict[str, str]:  # type: ignore[override]
        return {"templates": ", ".join(r.template for r in self._resources)}

    def raw_match(self, path: str) -> bool:
        return any(r.raw_match(path) for r in self._resources)

    async def resolve(self, request: web.Request) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        allowed: set[str] = set()
        path = request.rel_url.path_safe
        segments = path.strip("/").split("/")
        key = (segments[0].lower(), len(segments))
        for resource in (*self._candidates.get(key, ()), *self._candidates.get(("", len(segments)), ())):
            params = resource.match_path(path)
            if params is None:
                continue
            route = resource.by_method.get(request.method)
            if route is not None:
                return web.UrlMappingMatchInfo(params, route), set(resource.by_method)
            allowed.update(resource.by_method)
        return None, allowed

    def __len__(self) -> int:
        return sum(len(r) for r in self._resources)

    def __iter__(self) -> Iterator[web.AbstractRoute]:
        for resource in self._resources:
            yield from resource


def canonical_path(table: RouteTable, path: str) -> str | None:
    """The template a path resolves to (any method), or None: for tests and diagnostics."""
    for resource in table._resources:
        if resource.match_path(path) is not None:
            return resource.template
    return None
