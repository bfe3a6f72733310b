"""Device twin routes (`GET /twins/{id}`), in Azure's twin JSON shape.

For now a twin is derived from the device identity with empty tags and properties; the twins
feature replaces `twin_for` with stored tags/desired/reported and real versions, keeping the shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tether.registry.models import Capabilities, X509Thumbprint

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
