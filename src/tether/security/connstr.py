"""Azure IoT Hub connection strings: parse what operators paste, build what the CLI prints.

Grammar (same as the SDKs): `Key=Value` pairs separated by `;`, each split on its FIRST `=` (base64
keys end in `=`). Unknown keys, duplicated keys, empty values and incomplete or mixed credentials are
errors. Keys never appear in `repr()`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from tether.errors import BadRequest
from tether.registry.models import DEVICE_ID_RE

__all__ = [
    "ConnectionStringError",
    "DeviceConnectionString",
    "ServiceConnectionString",
    "parse_connection_string",
]

HOST_NAME = "HostName"
DEVICE_ID = "DeviceId"
MODULE_ID = "ModuleId"
SHARED_ACCESS_KEY = "SharedAccessKey"
SHARED_ACCESS_KEY_NAME = "SharedAccessKeyName"
SHARED_ACCESS_SIGNATURE = "SharedAccessSignature"
GATEWAY_HOST_NAME = "GatewayHostName"
X509 = "x509"

_DEVICE_KEYS = frozenset(
    {HOST_NAME, DEVICE_ID, MODULE_ID, SHARED_ACCESS_KEY, SHARED_ACCESS_SIGNATURE, GATEWAY_HOST_NAME, X509}
)
_SERVICE_KEYS = frozenset({HOST_NAME, SHARED_ACCESS_KEY_NAME, SHARED_ACCESS_KEY})
_ALL_KEYS = _DEVICE_KEYS | _SERVICE_KEYS
# host or host:port, no path, no spaces; IPv6 literals in brackets.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_POLICY_RE = re.compile(r"[A-Za-z0-9._\-]{1,64}")


class ConnectionStringError(BadRequest):
    """The connection string is malformed; the message names the offending key, never a value."""

    default_code = "ArgumentInvalid"


def _split(text: str) -> dict[str, str]:
    if not isinstance(text, str):
        raise ConnectionStringError("connection string must be a string")
    text = text.strip()
    if not text:
        raise ConnectionStringError("connection string is empty")
    pairs: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ConnectionStringError("connection string segment is not Key=Value")
        if key not in _ALL_KEYS:
            raise ConnectionStringError("unknown connection string key")
        if key in pairs:
            raise ConnectionStringError(f"duplicated connection string key {key}", field=key)
        if not value:
            raise ConnectionStringError(f"empty value for {key}", field=key)
        pairs[key] = value
    return pairs


def _check_host(value: str, key: str) -> str:
    if not _HOST_RE.fullmatch(value) or len(value) > 253:
        raise ConnectionStringError(f"{key} must be a host name (optionally host:port)", field=key)
    return value


def _check_key(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConnectionStringError("SharedAccessKey must be base64", field=SHARED_ACCESS_KEY) from None
    if not raw:
        raise ConnectionStringError("SharedAccessKey is empty", field=SHARED_ACCESS_KEY)
    return value


def _check_id(value: str, key: str) -> str:
    if not DEVICE_ID_RE.fullmatch(value):
        raise ConnectionStringError(f"{key} has invalid characters or length", field=key)
    return value


@dataclass(frozen=True, slots=True)
class DeviceConnectionString:
    """`HostName=…;DeviceId=…[;ModuleId=…](;SharedAccessKey=…|;x509=true|;SharedAccessSignature=…)
    [;GatewayHostName=…]` — exactly one credential."""

    host_name: str
    device_id: str
    shared_access_key: str | None = field(default=None, repr=False)
    module_id: str | None = None
    x509: bool = False
    gateway_host_name: str | None = None
    shared_access_signature: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_host(self.host_name, HOST_NAME)
        _check_id(self.device_id, DEVICE_ID)
        if self.module_id is not None:
            _check_id(self.module_id, MODULE_ID)
        if self.gateway_host_name is not None:
            _check_host(self.gateway_host_name, GATEWAY_HOST_NAME)
        if self.shared_access_key is not None:
            _check_key(self.shared_access_key)
        credentials = [
            self.shared_access_key is not None,
            self.x509,
            self.shared_access_signature is not None,
        ]
        if sum(credentials) != 1:
            raise ConnectionStringError(
                "device connection string needs exactly one of SharedAccessKey, x509=true, "
                "SharedAccessSignature"
            )

    @classmethod
    def parse(cls, text: str) -> DeviceConnectionString:
        pairs = _split(text)
        extra = set(pairs) - _DEVICE_KEYS
        if extra:
            raise ConnectionStringError(f"{sorted(extra)[0]} is not valid in a device connection string")
        for required in (HOST_NAME, DEVICE_ID):
            if required not in pairs:
                raise ConnectionStringError(f"missing {required}", field=required)
        x509 = pairs.get(X509)
        if x509 is not None and x509.lower() != "true":
            raise ConnectionStringError("x509 must be 'true' when present", field=X509)
        return cls(
            host_name=pairs[HOST_NAME],
            device_id=pairs[DEVICE_ID],
            shared_access_key=pairs.get(SHARED_ACCESS_KEY),
            module_id=pairs.get(MODULE_ID),
            x509=x509 is not None,
            gateway_host_name=pairs.get(GATEWAY_HOST_NAME),
            shared_access_signature=pairs.get(SHARED_ACCESS_SIGNATURE),
        )

    def __str__(self) -> str:
        parts = [f"{HOST_NAME}={self.host_name}", f"{DEVICE_ID}={self.device_id}"]
        if self.module_id is not None:
            parts.append(f"{MODULE_ID}={self.module_id}")
        if self.shared_access_key is not None:
            parts.append(f"{SHARED_ACCESS_KEY}={self.shared_access_key}")
        if self.shared_access_signature is not None:
            parts.append(f"{SHARED_ACCESS_SIGNATURE}={self.shared_access_signature}")
        if self.x509:
            parts.append(f"{X509}=true")
        if self.gateway_host_name is not None:
            parts.append(f"{GATEWAY_HOST_NAME}={self.gateway_host_name}")
        return ";".join(parts)

    @property
    def resource_uri(self) -> str:
        """The SAS resource this identity signs: `{host}/devices/{id}[/modules/{mid}]`."""
        base = f"{self.host_name}/devices/{self.device_id}"
        return f"{base}/modules/{self.module_id}" if self.module_id else base


@dataclass(frozen=True, slots=True)
class ServiceConnectionString:
    """`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` for a shared access policy."""

    host_name: str
    shared_access_key_name: str
    shared_access_key: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_host(self.host_name, HOST_NAME)
        if not _POLICY_RE.fullmatch(self.shared_access_key_name):
            raise ConnectionStringError(
                "SharedAccessKeyName has invalid characters or length", field=SHARED_ACCESS_KEY_NAME
            )
        _check_key(self.shared_access_key)

    @classmethod
    def parse(cls, text: str) -> ServiceConnectionString:
        pairs = _split(text)
        extra = set(pairs) - _SERVICE_KEYS
        if extra:
            raise ConnectionStringError(f"{sorted(extra)[0]} is not valid in a service connection string")
        for required in (HOST_NAME, SHARED_ACCESS_KEY_NAME, SHARED_ACCESS_KEY):
            if required not in pairs:
                raise ConnectionStringError(f"missing {required}", field=required)
        return cls(
            host_name=pairs[HOST_NAME],
            shared_access_key_name=pairs[SHARED_ACCESS_KEY_NAME],
            shared_access_key=pairs[SHARED_ACCESS_KEY],
        )

    def __str__(self) -> str:
        return (
            f"{HOST_NAME}={self.host_name};{SHARED_ACCESS_KEY_NAME}={self.shared_access_key_name};"
            f"{SHARED_ACCESS_KEY}={self.shared_access_key}"
        )


def parse_connection_string(text: str) -> DeviceConnectionString | ServiceConnectionString:
    """Parse either kind: a `SharedAccessKeyName` makes it a service string, `DeviceId` a device one."""
    pairs = _split(text)
    if SHARED_ACCESS_KEY_NAME in pairs:
        return ServiceConnectionString.parse(text)
    if DEVICE_ID in pairs:
        return DeviceConnectionString.parse(text)
    raise ConnectionStringError("connection string has neither DeviceId nor SharedAccessKeyName")
