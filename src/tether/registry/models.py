"""Device identity records in Azure IoT Hub's JSON shape (camelCase on the wire).

`Device` is both the REST model and the stored record: storage keeps it as JSON plus a few indexed
columns, so a field added here needs no migration unless it must be queried.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Azure: <= 128 chars of ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ '
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")
EPOCH = datetime(1, 1, 1, tzinfo=UTC)  # Azure's "never" timestamp: 0001-01-01T00:00:00Z


def utcnow() -> datetime:
    return datetime.now(UTC)


def validate_device_id(value: str, field: str = "deviceId") -> str:
    if not isinstance(value, str) or not DEVICE_ID_RE.fullmatch(value):
        from tether.errors import BadRequest

        raise BadRequest(
            f"{field} must be 1-128 characters of letters, digits and -.%_*?!(),:=@$'",
            code="ArgumentInvalid",
            field=field,
        )
    return value


def checked_id(value: str) -> str:
    """A device or module id by Azure's rules (a pydantic validator: raises ValueError)."""
    if not DEVICE_ID_RE.fullmatch(value):
        raise ValueError("must be 1-128 characters of letters, digits and -.%_*?!(),:=@$'")
    return value


def validate_key(value: str) -> str:
    """A supplied symmetric key must be base64 of 16..64 bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("must be valid base64") from exc
    if not 16 <= len(raw) <= 64:
        raise ValueError("must decode to 16-64 bytes")
    return value


class Camel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class DeviceStatus(StrEnum):
    enabled = "enabled"
    disabled = "disabled"


class ConnectionState(StrEnum):
    connected = "Connected"
    disconnected = "Disconnected"


class AuthType(StrEnum):
    sas = "sas"
    self_signed = "selfSigned"
    certificate_authority = "certificateAuthority"
    none = "none"


class SymmetricKey(Camel):
    primary_key: str | None = Field(None, alias="primaryKey")
    secondary_key: str | None = Field(None, alias="secondaryKey")

    @field_validator("primary_key", "secondary_key")
    @classmethod
    def _key_ok(cls, v: str | None) -> str | None:
        return None if v in (None, "") else validate_key(v)  # type: ignore[arg-type]


Thumbprint = Annotated[str, Field(pattern=r"^([0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$")]


class X509Thumbprint(Camel):
    primary_thumbprint: Thumbprint | None = Field(None, alias="primaryThumbprint")
    secondary_thumbprint: Thumbprint | None = Field(None, alias="secondaryThumbprint")


class Authentication(Camel):
    type: AuthType = AuthType.sas
    symmetric_key: SymmetricKey = Field(default_factory=SymmetricKey, alias="symmetricKey")
    x509_thumbprint: X509Thumbprint = Field(default_factory=X509Thumbprint, alias="x509Thumbprint")


class Capabilities(Camel):
    iot_edge: bool = Field(False, alias="iotEdge")


class Device(Camel):
    """A device identity. Server-managed fields are ignored on input and set by the registry."""

    device_id: str = Field(alias="deviceId")
    module_id: str | None = Field(None, alias="moduleId", exclude=True)
    generation_id: str = Field("", alias="generationId")
    etag: str = ""
    status: DeviceStatus = DeviceStatus.enabled
    status_reason: str | None = Field(None, alias="statusReason", max_length=128)
    status_updated_time: datetime = Field(EPOCH, alias="statusUpdatedTime")
    connection_state: ConnectionState = Field(ConnectionState.disconnected, alias="connectionState")
    connection_state_updated_time: datetime = Field(EPOCH, alias="connectionStateUpdatedTime")
    last_activity_time: datetime = Field(EPOCH, alias="lastActivityTime")
    cloud_to_device_message_count: int = Field(0, alias="cloudToDeviceMessageCount")
    authentication: Authentication = Field(default_factory=Authentication)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    device_scope: str | None = Field(None, alias="deviceScope")
    parent_scopes: list[str] = Field(default_factory=list, alias="parentScopes")
    revoked_serials: list[str] = Field(default_factory=list, alias="revokedCertificateSerials")

    @field_validator("device_id")
    @classmethod
    def _id_ok(cls, v: str) -> str:
        return checked_id(v)

    @property
    def enabled(self) -> bool:
        return self.status is DeviceStatus.enabled

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class Module(Camel):
    """A module identity of a device (Azure's `Module`): its own keys or certificate, its own twin and
    connection. Modules have no status of their own: they can connect while their device is enabled.
    Server-managed fields are ignored on input and set by the registry."""

    module_id: str = Field(alias="moduleId")
    device_id: str = Field(alias="deviceId")
    managed_by: str | None = Field(None, alias="managedBy", max_length=128)
    generation_id: str = Field("", alias="generationId")
    etag: str = ""
    connection_state: ConnectionState = Field(ConnectionState.disconnected, alias="connectionState")
    connection_state_updated_time: datetime = Field(EPOCH, alias="connectionStateUpdatedTime")
    last_activity_time: datetime = Field(EPOCH, alias="lastActivityTime")
    cloud_to_device_message_count: int = Field(0, alias="cloudToDeviceMessageCount")
    authentication: Authentication = Field(default_factory=Authentication)

    @field_validator("device_id", "module_id")
    @classmethod
    def _id_ok(cls, v: str) -> str:
        return checked_id(v)

    @property
    def key(self) -> tuple[str, str]:
        return self.device_id, self.module_id

    def identity(self) -> Device:
        """The module as the authenticator and the certificate verifier see an identity: its own
        authentication, `module_id` set, always enabled (the device's status decides)."""
        return Device(device_id=self.device_id, module_id=self.module_id, generation_id=self.generation_id,
                      etag=self.etag, authentication=self.authentication,
                      connection_state=self.connection_state,
                      connection_state_updated_time=self.connection_state_updated_time,
                      last_activity_time=self.last_activity_time)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class RegistryStatistics(Camel):
    total_device_count: int = Field(alias="totalDeviceCount")
    enabled_device_count: int = Field(alias="enabledDeviceCount")
    disabled_device_count: int = Field(alias="disabledDeviceCount")
