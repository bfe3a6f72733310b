"""Direct-method REST routes (ServiceConnect), Azure's `POST /twins/{id}/methods` and
`POST /twins/{id}/modules/{mid}/methods`.

Body `{"methodName", "payload", "responseTimeoutInSeconds", "connectTimeoutInSeconds"}` → 200
`{"status", "payload"}`: the device's own status code and JSON answer, whatever that status is.
Errors: 400 (bad name, timeout out of range, payload over 128 KB, unknown field), 404
`DeviceNotFound` / `DeviceNotOnline` (not connected, not subscribed to methods, or disconnected
before answering), 504 `GatewayTimeout` (no answer in time). The call itself runs in
`tether.messaging.methods`.

`FEATURE` is this module's part of the route table (`api.app` lists it).
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tether.api.bodies import read_json_object
from tether.api.context import hub_of, principal_of
from tether.api.devices import path_device_id
from tether.api.routes import Feature, Route
from tether.errors import BadRequest
from tether.messaging.methods import (
    CONNECT_TIMEOUT_RANGE,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_RESPONSE_TIMEOUT_S,
    MAX_METHOD_NAME_LENGTH,
    RESPONSE_TIMEOUT_RANGE,
)
from tether.registry.models import validate_device_id
from tether.security.principal import Permission

__all__ = [
    "FEATURE",
    "METHOD_PATHS",
    "MethodInvocation",
    "MethodResultBody",
    "invoke_device_method",
    "invoke_module_method",
]

SERVICE = Permission.service_connect
FIELDS: Final = frozenset({"methodName", "payload", "responseTimeoutInSeconds", "connectTimeoutInSeconds"})


class MethodInvocation(BaseModel):
    """Azure's `CloudToDeviceMethod`."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    method_name: str = Field(alias="methodName", min_length=1, max_length=MAX_METHOD_NAME_LENGTH,
                             description="Printable ASCII without '/'.")
    payload: Any = Field(None, description="Any JSON value (at most 128 KB serialized); null if absent.")
    response_timeout_in_seconds: int = Field(
        DEFAULT_RESPONSE_TIMEOUT_S, alias="responseTimeoutInSeconds",
        ge=RESPONSE_TIMEOUT_RANGE[0], le=RESPONSE_TIMEOUT_RANGE[1],
        description="How long to wait for the device's answer.")
    connect_timeout_in_seconds: int = Field(
        DEFAULT_CONNECT_TIMEOUT_S, alias="connectTimeoutInSeconds",
        ge=CONNECT_TIMEOUT_RANGE[0], le=CONNECT_TIMEOUT_RANGE[1],
        description="How long to wait for an offline device to connect and subscribe to methods.")


class MethodResultBody(BaseModel):
    """Azure's `CloudToDeviceMethodResult`: the device's status code and JSON payload."""

    status: int
    payload: Any = None


async def _invoke(request: web.Request, device_id: str, module_id: str | None) -> web.Response:
    body = await read_json_object(request)
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]}", field=unknown[0])
    if "methodName" not in body:
        raise BadRequest("methodName is required", field="methodName")
    result = await hub_of(request).methods.invoke(
        device_id,
        module_id,
        method_name=body["methodName"],
        payload=body.get("payload"),
        response_timeout_s=body.get("responseTimeoutInSeconds"),
        connect_timeout_s=body.get("connectTimeoutInSeconds"),
        actor=principal_of(request).name,
    )
    return web.json_response({"status": result.status, "payload": result.payload})


async def invoke_device_method(request: web.Request) -> web.Response:
    return await _invoke(request, path_device_id(request), None)


async def invoke_module_method(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    return await _invoke(request, device_id, validate_device_id(request.match_info["mid"], field="moduleId"))


_ERRORS = ("400 for a bad methodName, timeout or a payload over 128 KB; 404 DeviceNotOnline when the "
           "device is not connected and subscribed to `$iothub/methods/POST/#` within "
           "connectTimeoutInSeconds (or disconnects before answering); 504 GatewayTimeout when it does "
           "not answer within responseTimeoutInSeconds.")

METHOD_PATHS: Final = (("POST", "/twins/{id}/methods"), ("POST", "/twins/{id}/modules/{mid}/methods"))


FEATURE = Feature("methods", (
    Route("POST", "/twins/{id}/methods", invoke_device_method, "Invoke a direct method on a device",
          SERVICE, "methods", request=MethodInvocation, response=MethodResultBody,
          description="Answers 200 with the device's own status and payload. " + _ERRORS),
    Route("POST", "/twins/{id}/modules/{mid}/methods", invoke_module_method,
          "Invoke a direct method on a module", SERVICE, "methods", request=MethodInvocation,
          response=MethodResultBody,
          description="Like the device route, for the module `mid` of device `id`. " + _ERRORS),
))
