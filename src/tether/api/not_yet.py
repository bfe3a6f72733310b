"""Azure IoT Hub operations Tether does not implement yet, each answering a clean Azure error.

Digital twins (IoT Plug and Play) are planned. Until then their routes exist so that an SDK
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


_DIGITAL = _answer("digital twins")


def _r(method: str, path: str, handler: Callable[[web.Request], Awaitable[web.Response]], summary: str,
       permission: Permission, tag: str, *, self_auth: bool = False) -> Route:
    return Route(method, path, handler, summary, permission, tag, not_yet=True, self_auth=self_auth,
                 description="Not implemented yet: 501 NotImplemented.")


FEATURE = Feature("not-yet", (
    # digital twins (DigitalTwinClient)
    _r("GET", "/digitaltwins/{id}", _DIGITAL, "Get a digital twin", READ, "digital-twins"),
    _r("PATCH", "/digitaltwins/{id}", _DIGITAL, "Update a digital twin", WRITE, "digital-twins"),
    _r("POST", "/digitaltwins/{id}/commands/{commandName}", _DIGITAL, "Invoke a root-level command",
       SERVICE, "digital-twins"),
    _r("POST", "/digitaltwins/{id}/components/{componentPath}/commands/{commandName}", _DIGITAL,
       "Invoke a component command", SERVICE, "digital-twins"),
))
