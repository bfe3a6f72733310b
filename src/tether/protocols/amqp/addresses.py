"""AMQP node addresses and CBS audiences as the Azure SDKs write them, parsed once.

Clients write addresses relative (`/devices/d1/messages/events`) or as URLs
(`amqps://{host}/messages/devicebound`, uamqp); spell `devicebound` or `deviceBound`; and the service
SDKs URL-encode device ids (`dev%201`). `node_path` reduces all of these to one path; routes then match
it case-insensitively, keeping the device id's own case.

CBS audiences (put-token `name`) come as `{host}/devices/{id}` (URL-encoded, Node device), the bare
HostName (Node service), `https://{host[:port]}` (uamqp) or `sb://…` (Event Hubs): `parse_audience`
returns the host and the identity the audience names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

__all__ = ["Audience", "node_path", "parse_audience"]

_SCHEME: Final = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def node_path(address: str | None) -> str:
    """The path of an address: scheme and host dropped, one leading `/`, no trailing `/`.
    `$cbs` and other `$` nodes stay as they are."""
    if not address:
        return ""
    text = address.strip()
    if _SCHEME.match(text):
        rest = _SCHEME.sub("", text, count=1)
        slash = rest.find("/")
        text = rest[slash:] if slash >= 0 else "/"
    if text.startswith("$"):
        return text
    text = "/" + text.lstrip("/")
    return text.rstrip("/") or "/"


@dataclass(frozen=True, slots=True)
class Audience:
    """What a CBS audience names: the hub itself (`device_id` None) or a device or module."""

    host: str
    device_id: str | None = None
    module_id: str | None = None
    path: str = ""  # anything else after the host (Event Hubs entities), decoded


_DEVICE: Final = re.compile(r"^/devices/(?P<device>[^/]+)(?:/modules/(?P<module>[^/]+))?/?$", re.IGNORECASE)


def parse_audience(name: str) -> Audience:
    """Split a CBS audience into host and identity (URL-decoded; scheme dropped)."""
    text = unquote(name.strip())
    text = _SCHEME.sub("", text, count=1)
    host, slash, rest = text.partition("/")
    path = slash + rest
    match = _DEVICE.match(path)
    if match is not None:
        return Audience(host=host, device_id=match["device"], module_id=match["module"])
    return Audience(host=host, path=path.rstrip("/"))
