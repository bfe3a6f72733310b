"""Azure IoT Hub operations Tether does not implement yet, each answering a clean Azure error.

Jobs, configurations, digital twins and file upload are planned. Until then their routes exist so that an SDK
calling them gets Azure's error shape instead of a bare 404: **501** with code `NotImplemented`, which
no SDK retries (msrest treats 501 as final; Node's and .NET's retry policies retry throttling and
500/503-class errors only), after the normal authentication. Marked `x-tether-not-yet` in the OpenAPI
document and "not yet" in docs/api.md.

To implement one: add its route to its own module's `FEATURE` (as `module_routes.py` did) and delete
its line here; the conformance catalogue (`tests/conformance/catalogue.py`) then says what to test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from tether.api.device_routes import authenticate_device
from tether.api.routes import READ, WRITE, Feature, Route
from tether.errors import TetherError
from tether.security.principal import Permission

__all__ = ["FEATURE", "NotImplementedYet"]

SERVICE: Final = Permission.service_connect
DEVICE: Final = Permission.device_connect


class NotImplementedYet(TetherError):
    http_status = 501
    default_code = "NotImplemented"


def _answer(area: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def not_yet(request: web.Request) -> web.Response:
        raise NotImplementedYet(f"{request.method} {request.path}: {area} are not supported by Tether yet")

    not_yet.__name__ = f"not_yet_{area.replace(' ', '_')}"
    return not_yet


def _device_answer(area: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Device routes authenticate the device (as the device HTTPS surface does) before answering."""
    answer = _answer(area)

    async def not_yet(request: web.Request) -> web.Response:
        await authenticate_device(request, request.match_info["id"])
        return await answer(request)

    not_yet.__name__ = f"not_yet_device_{area.replace(' ', '_')}"
    return not_yet


_CONFIGS = _answer("configurations")
_JOBS = _answer("jobs")
_DIGITAL = _answer("digital twins")
_FILES = _device_answer("file uploads")


def _r(method: str, path: str, handler: Callable[[web.Request], Awaitable[web.Response]], summary: str,
       permission: Permission, tag: str, *, self_auth: bool = False) -> Route:
    return Route(method, path, handler, summary, permission, tag, not_yet=True, self_auth=self_auth,
                 description="Not implemented yet: 501 NotImplemented.")


FEATURE = Feature("not-yet", (
    # configurations (IoTHubConfigurationManager)
    _r("GET", "/configurations", _CONFIGS, "List configurations", READ, "configurations"),
    _r("GET", "/configurations/{id}", _CONFIGS, "Get a configuration", READ, "configurations"),
    _r("PUT", "/configurations/{id}", _CONFIGS, "Create or replace a configuration", WRITE,
       "configurations"),
    _r("DELETE", "/configurations/{id}", _CONFIGS, "Delete a configuration", WRITE, "configurations"),
    _r("POST", "/configurations/testQueries", _CONFIGS, "Validate configuration queries", READ,
       "configurations"),
    _r("POST", "/devices/{id}/applyConfigurationContent", _CONFIGS, "Apply edge configuration content",
       WRITE, "configurations"),
    # jobs (IoTHubJobManager)
    _r("POST", "/jobs/create", _JOBS, "Create an import/export job", WRITE, "jobs"),
    _r("GET", "/jobs", _JOBS, "List import/export jobs", READ, "jobs"),
    _r("GET", "/jobs/{id}", _JOBS, "Get an import/export job", READ, "jobs"),
    _r("DELETE", "/jobs/{id}", _JOBS, "Cancel an import/export job", WRITE, "jobs"),
    _r("GET", "/jobs/v2/query", _JOBS, "Query scheduled jobs", READ, "jobs"),
    _r("GET", "/jobs/v2/{id}", _JOBS, "Get a scheduled job", READ, "jobs"),
    _r("PUT", "/jobs/v2/{id}", _JOBS, "Create a scheduled job", WRITE, "jobs"),
    _r("POST", "/jobs/v2/{id}/cancel", _JOBS, "Cancel a scheduled job", WRITE, "jobs"),
    # digital twins (DigitalTwinClient)
    _r("GET", "/digitaltwins/{id}", _DIGITAL, "Get a digital twin", READ, "digital-twins"),
    _r("PATCH", "/digitaltwins/{id}", _DIGITAL, "Update a digital twin", WRITE, "digital-twins"),
    _r("POST", "/digitaltwins/{id}/commands/{commandName}", _DIGITAL, "Invoke a root-level command",
       SERVICE, "digital-twins"),
    _r("POST", "/digitaltwins/{id}/components/{componentPath}/commands/{commandName}", _DIGITAL,
       "Invoke a component command", SERVICE, "digital-twins"),
    # file upload (device HTTPS: IoTHubDeviceClient.get_storage_info_for_blob / notify_blob_upload_status)
    _r("POST", "/devices/{id}/files", _FILES, "Device: get a blob SAS URI for a file upload", DEVICE,
       "device-https", self_auth=True),
    _r("POST", "/devices/{id}/files/notifications", _FILES, "Device: notify a finished file upload",
       DEVICE, "device-https", self_auth=True),
))
