"""Operations routes (no credential): the OpenAPI document, the liveness probe, Prometheus metrics;
plus MQTT over WebSockets (`GET /$iothub/websocket`), where the device authenticates in CONNECT."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from tether.api.openapi import serve_spec
from tether.api.routes import Feature, Route
from tether.observability.metrics import metrics_handler
from tether.protocols.mqtt.websocket import mqtt_websocket_handler
from tether.security.principal import Permission

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["FEATURE", "Health"]

WEBSOCKET_KEY: Final[web.AppKey[Handler]] = web.AppKey("mqtt_websocket_handler")


class Health(BaseModel):
    status: Literal["ok"]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def mqtt_websocket(request: web.Request) -> web.StreamResponse:
    return await request.app[WEBSOCKET_KEY](request)


def _setup(app: web.Application, hub: Hub) -> None:
    app[WEBSOCKET_KEY] = mqtt_websocket_handler(hub)


FEATURE = Feature("operations", (
    Route("GET", "/openapi.json", serve_spec, "This OpenAPI 3.1 document", None, "meta", response="object"),
    Route("GET", "/healthz", healthz, "Liveness probe", None, "meta", response=Health),
    Route("GET", "/metrics", metrics_handler, "Prometheus metrics", None, "operations"),
    Route("GET", "/$iothub/websocket", mqtt_websocket, "MQTT 3.1.1 over WebSockets (subprotocol `mqtt`); "
          "the device authenticates in CONNECT", Permission.device_connect, "device-mqtt", self_auth=True),
), setup=_setup)
