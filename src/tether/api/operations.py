"""Operations routes (no credential): the OpenAPI document, the liveness probe, Prometheus metrics;
plus the WebSocket transports: `GET /$iothub/websocket` carries MQTT (subprotocol `mqtt`; the device
authenticates in CONNECT) and AMQP (`AMQPWSB10`; SASL or CBS), `/$servicebus/websocket[/]` AMQP for the
service and Event Hubs SDKs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from tether.api.openapi import serve_spec
from tether.api.routes import Feature, Route
from tether.observability.metrics import metrics_handler
from tether.protocols.amqp.websocket import SERVICEBUS_WEBSOCKET_PATHS, amqp_websocket_handler, wants_amqp
from tether.protocols.mqtt.websocket import mqtt_websocket_handler
from tether.security.principal import Permission

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["FEATURE", "Health"]

WEBSOCKET_KEY: Final[web.AppKey[Handler]] = web.AppKey("mqtt_websocket_handler")
AMQP_WEBSOCKET_KEY: Final[web.AppKey[Handler]] = web.AppKey("amqp_websocket_handler")


class Health(BaseModel):
    status: Literal["ok"]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def device_websocket(request: web.Request) -> web.StreamResponse:
    """MQTT or AMQP, chosen by the subprotocol the client asks for."""
    if wants_amqp(request):
        return await request.app[AMQP_WEBSOCKET_KEY](request)
    return await request.app[WEBSOCKET_KEY](request)


async def amqp_websocket(request: web.Request) -> web.StreamResponse:
    return await request.app[AMQP_WEBSOCKET_KEY](request)


def _setup(app: web.Application, hub: Hub) -> None:
    app[WEBSOCKET_KEY] = mqtt_websocket_handler(hub)
    app[AMQP_WEBSOCKET_KEY] = amqp_websocket_handler(hub)


FEATURE = Feature("operations", (
    Route("GET", "/openapi.json", serve_spec, "This OpenAPI 3.1 document", None, "meta", response="object"),
    Route("GET", "/healthz", healthz, "Liveness probe", None, "meta", response=Health),
    Route("GET", "/metrics", metrics_handler, "Prometheus metrics", None, "operations"),
    Route("GET", "/$iothub/websocket", device_websocket, "MQTT 3.1.1 over WebSockets (subprotocol `mqtt`; "
          "the device authenticates in CONNECT) and AMQP 1.0 over WebSockets (subprotocol `AMQPWSB10`; "
          "SASL or CBS)", Permission.device_connect, "device-mqtt", self_auth=True),
    *(Route("GET", path, amqp_websocket, "AMQP 1.0 over WebSockets (subprotocol `AMQPWSB10`) for the "
            "service and Event Hubs SDKs", Permission.service_connect, "amqp", self_auth=True)
      for path in SERVICEBUS_WEBSOCKET_PATHS),
), setup=_setup)
