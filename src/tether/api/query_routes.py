"""`POST /devices/query`: Azure IoT Hub's twin query, paged with `x-ms-max-item-count` (request) and
`x-ms-continuation` (request and response). The answer is a JSON array; `x-ms-item-type` says
`twin` (SELECT *) or `raw` (projections and aggregates). The query runs in `tether.messaging.query`.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tether.api.bodies import read_json_object
from tether.api.context import hub_of
from tether.api.operator_guard import scopes_of
from tether.api.twin_routes import twins_of
from tether.errors import BadRequest
from tether.messaging.query import DEFAULT_PAGE, MAX_PAGE, QueryService

MAX_ITEM_COUNT = "x-ms-max-item-count"
CONTINUATION = "x-ms-continuation"
MAX_TOKEN_CHARS = 4096


class QuerySpecification(BaseModel):
    """Body of `POST /devices/query` (for the OpenAPI document; the handler checks it by hand so
    errors name `query`)."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(description="e.g. SELECT * FROM devices WHERE tags.site = 'north'")


def _max_items(request: web.Request) -> int:
    """Default 100; values above 1000 are served as 1000 (like `GET /devices?top=`)."""
    raw = request.headers.get(MAX_ITEM_COUNT, "").strip()
    if not raw:
        return DEFAULT_PAGE
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{MAX_ITEM_COUNT} must be an integer", field=MAX_ITEM_COUNT) from None
    if value < 1:
        raise BadRequest(f"{MAX_ITEM_COUNT} must be at least 1", field=MAX_ITEM_COUNT)
    return min(value, MAX_PAGE)


async def query_devices(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    extra = sorted(k for k in body if k != "query")
    if extra:
        raise BadRequest(f"unknown field {extra[0]} (the body is {{\"query\": \"…\"}})", field=extra[0])
    text = body.get("query")
    if not isinstance(text, str):
        raise BadRequest("query must be a string", field="query")
    token = request.headers.get(CONTINUATION) or None
    if token is not None and len(token) > MAX_TOKEN_CHARS:
        raise BadRequest(f"{CONTINUATION} is too long", field=CONTINUATION)
    sources = {"devices.jobs": hub_of(request).jobs.query_source()}
    page = await QueryService(twins_of(request), sources=sources).run(
        text, max_items=_max_items(request), continuation=token, scopes=scopes_of(request))
    headers = {"x-ms-item-type": page.item_type}
    if page.continuation is not None:
        headers[CONTINUATION] = page.continuation
    return web.json_response(page.items, headers=headers)


__all__ = ["QuerySpecification", "query_devices"]
