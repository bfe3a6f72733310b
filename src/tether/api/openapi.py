"""OpenAPI 3.1 document generated from the route table and the pydantic models.

Component schemas come from `models_json_schema(by_alias=True)`, so the wire names (camelCase)
are what the spec shows; paths come from `routes.ROUTES`, the same table `build_app` registers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import tether
from tether.api.context import SPEC_KEY

if TYPE_CHECKING:
    from tether.api.routes import Route

REF = "#/components/schemas/{model}"
Refs = Mapping[tuple[type[Any], JsonSchemaMode], dict[str, Any]]
_PATH_PARAM = re.compile(r"{(\w+)}")
_PATH_PARAM_DOC = {
    "id": ("Device id: 1-128 of letters, digits and -.%_*?!(),:=@$'", {"type": "string", "maxLength": 128}),
    "name": ("Shared access policy name.", {"type": "string"}),
}


class ErrorBody(BaseModel):
    """Every error answer: Azure's error code, a message, and the offending field when known."""

    model_config = ConfigDict(populate_by_name=True)
    error_code: str = Field(alias="errorCode")
    message: str
    field: str | None = None


_ERRORS = {
    400: "Invalid request (malformed JSON, unknown field, bad value); `field` names it.",
    401: "Missing, malformed, expired or wrong credential.",
    403: "Valid credential without the needed right.",
    404: "Not found.",
    409: "Already exists.",
    412: "If-Match etag is stale.",
    413: "Request body too large.",
}


def _models(routes: tuple[Route, ...]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorBody, "serialization"): None}
    for route in routes:
        if isinstance(route.request, type):
            wanted[(route.request, "validation")] = None
        if isinstance(route.response, type):
            wanted[(route.response, "serialization")] = None
    return list(wanted)


def _operation_id(route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path).replace("-", "/").split("/")
    return route.method.lower() + "".join(w[:1].upper() + w[1:] for w in words if w)


def _error_statuses(route: Route) -> list[int]:
    statuses = [400]
    if route.permission is not None:
        statuses += [401, 403]
    if "{" in route.path:
        statuses.append(404)
    if route.method == "PUT":
        statuses.append(409)
    if route.path == "/devices/{id}" and route.method in ("PUT", "DELETE"):
        statuses.append(412)
    if route.request is not None:
        statuses.append(413)
    return sorted(set(statuses))


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    params: list[dict[str, Any]] = []
    for name in _PATH_PARAM.findall(route.path):
        description, schema = _PATH_PARAM_DOC.get(name, ("", {"type": "string"}))
        params.append({"name": name, "in": "path", "required": True, "description": description,
                       "schema": schema})
    params.append({"name": "api-version", "in": "query", "required": False,
                   "description": "Optional; when given must be YYYY-MM-DD[-preview] (e.g. 2021-04-12).",
                   "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}(-preview)?$"}})
    for p in route.params:
        params.append({"name": p.name, "in": p.where, "required": p.required, "description": p.description,
                       "schema": p.schema})

    op: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": params,
    }
    if route.description:
        op["description"] = route.description
    if route.permission is None:
        op["security"] = []
    else:
        op["x-required-permission"] = str(route.permission)
    if route.extension:
        op["x-tether-extension"] = True
    if route.request is not None:
        media = (
            {"application/x-ndjson": {"schema": {"type": "string", "description": "JSON lines"}}}
            if route.request == "ndjson"
            else {"application/json": {"schema": _schema(route.request, "validation", refs)}}
        )
        op["requestBody"] = {"required": route.request_required, "content": media}

    success: dict[str, Any] = {"description": "Success"}
    if route.response is not None:
        if route.response == "ndjson":
            success["content"] = {"application/x-ndjson": {"schema": {"type": "string"}}}
        else:
            schema = _schema(route.response, "serialization", refs)
            if route.array:
                schema = {"type": "array", "items": schema}
            success["content"] = {"application/json": {"schema": schema}}
    if route.response_headers:
        success["headers"] = {h: {"schema": {"type": "string"}} for h in route.response_headers}
    responses: dict[str, Any] = {str(route.status): success}
    error_ref = refs[(ErrorBody, "serialization")]
    for status in _error_statuses(route):
        responses[str(status)] = {"description": _ERRORS[status],
                                  "content": {"application/json": {"schema": error_ref}}}
    responses["default"] = {"description": "Unexpected error",
                            "content": {"application/json": {"schema": error_ref}}}
    op["responses"] = responses
    return op


def _schema(body: type[BaseModel] | Literal["ndjson", "object"], mode: JsonSchemaMode,
            refs: Refs) -> dict[str, Any]:
    if isinstance(body, type):
        return dict(refs[(body, mode)])
    return {"type": "object"}


def build_spec(routes: tuple[Route, ...]) -> dict[str, Any]:
    refs, top = models_json_schema(_models(routes), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tether service API",
            "version": tether.__version__,
            "description": "Azure IoT Hub-compatible service REST API plus Tether extensions under "
                           "/tether (marked x-tether-extension).",
        },
        "servers": [{"url": "/"}],
        "security": [{"sas": []}, {"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "sas": {"type": "apiKey", "in": "header", "name": "Authorization",
                        "description": "SharedAccessSignature sr=…&sig=…&se=…&skn={policy}"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "An operator's access token from a configured OIDC provider; "
                                          "roles decide what it may do (docs/security.md)."},
                "session": {"type": "apiKey", "in": "cookie", "name": "__Host-tether-session",
                            "description": "A console session; state-changing calls also need the "
                                           "X-CSRF-Token header."},
            },
        },
    }


def spec_bytes(routes: tuple[Route, ...]) -> bytes:
    return json.dumps(build_spec(routes), indent=1, sort_keys=False).encode()


async def serve_spec(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SPEC_KEY], content_type="application/json")
