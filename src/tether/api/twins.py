"""Device twin routes (`GET /twins/{id}`), in Azure's twin JSON shape.

For now a twin is derived from the device identity with empty tags and properties; the twins
feature replaces `twin_for` with stored tags/desired/reported and real versions, keeping the shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tether.api.context import hub_of
from tether.api.devices import path_device_id
from tether.registry.models import Capabilities, Device, X509Thumbprint

INITIAL_TWIN_ETAG = "AAAAAAAAAAE="  # Azure's etag for a twin that was never written


class TwinCollection(BaseModel):
    """`properties.desired` / `properties.reported`: user keys plus `$metadata` and `$version`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    metadata: dict[str, Any] = Field(default_factory=dict, alias="$metadata")
    version: int = Field(1, alias="$version")


class TwinProperties(BaseModel):
    desired: TwinCollection
    reported: TwinCollection


class Twin(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    device_id: str = Field(alias="deviceId")
    module_id: str | None = Field(None, alias="moduleId")
    etag: str
    device_etag: str = Field(alias="deviceEtag")
    version: int
    status: str
    status_reason: str | None = Field(None, alias="statusReason")
    status_update_time: datetime = Field(alias="statusUpdateTime")
    connection_state: str = Field(alias="connectionState")
    last_activity_time: datetime = Field(alias="lastActivityTime")
    cloud_to_device_message_count: int = Field(alias="cloudToDeviceMessageCount")
    authentication_type: str = Field(alias="authenticationType")
    x509_thumbprint: X509Thumbprint = Field(alias="x509Thumbprint")
    capabilities: Capabilities
    tags: dict[str, Any] = Field(default_factory=dict)
    properties: TwinProperties

    def to_wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json", by_alias=True)
        if body.get("moduleId") is None:
            body.pop("moduleId", None)
        return body


def _collection(updated: datetime) -> TwinCollection:
    stamp = updated.isoformat().replace("+00:00", "Z")
    return TwinCollection.model_validate({"$metadata": {"$lastUpdated": stamp}, "$version": 1})


def twin_for(device: Device) -> Twin:
    """The twin of a device that has never had tags or properties written."""
    updated = device.status_updated_time
    return Twin(
        device_id=device.device_id,
        etag=INITIAL_TWIN_ETAG,
        device_etag=device.etag,
        version=1,
        status=device.status.value,
        status_reason=device.status_reason,
        status_update_time=device.status_updated_time,
        connection_state=device.connection_state.value,
        last_activity_time=device.last_activity_time,
        cloud_to_device_message_count=device.cloud_to_device_message_count,
        authentication_type=device.authentication.type.value,
        x509_thumbprint=device.authentication.x509_thumbprint,
        capabilities=device.capabilities,
        tags={},
        properties=TwinProperties(desired=_collection(updated), reported=_collection(updated)),
    )


async def get_twin(request: web.Request) -> web.Response:
    device = await hub_of(request).registry.get(path_device_id(request))
    twin = twin_for(device)
    return web.json_response(twin.to_wire(), headers={"ETag": f'"{twin.etag}"'})
