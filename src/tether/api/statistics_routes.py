"""Azure's statistics routes: `GET /statistics/devices` (registry counts) and `GET /statistics/service`
(`{"connectedDeviceCount"}`, which `IoTHubRegistryManager.get_service_statistics` reads).

The connected count comes from the registry's connection states after this node's buffered activity
is written, so it covers every node of a cluster (other nodes' last few seconds may lag, as Azure's
own statistics do).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tether.api.context import hub_of
from tether.api.routes import READ, Feature, Route
from tether.messaging.query import QueryService
from tether.registry.models import RegistryStatistics

__all__ = ["FEATURE", "ServiceStatistics"]

_CONNECTED = "SELECT COUNT() AS n FROM devices WHERE connectionState = 'Connected'"


class ServiceStatistics(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    connected_device_count: int = Field(alias="connectedDeviceCount")


async def device_statistics(request: web.Request) -> web.Response:
    stats = await hub_of(request).registry.statistics()
    return web.json_response(stats.model_dump(mode="json", by_alias=True))


async def service_statistics(request: web.Request) -> web.Response:
    hub = hub_of(request)
    await hub.registry.flush_activity()
    page = await QueryService(hub.twins).run(_CONNECTED)
    count = int(page.items[0]["n"]) if page.items else 0
    return web.json_response(ServiceStatistics(connected_device_count=count).model_dump(by_alias=True))


FEATURE = Feature("statistics", (
    Route("GET", "/statistics/devices", device_statistics, "Device counts", READ, "statistics",
          response=RegistryStatistics),
    Route("GET", "/statistics/service", service_statistics, "Service statistics: connected devices",
          READ, "statistics", response=ServiceStatistics,
          description="Devices whose connection state is Connected, across every node."),
))
