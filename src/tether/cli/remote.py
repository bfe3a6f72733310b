"""Remote mode: the same operations over a running hub's REST API, authenticated with a service
connection string (a SAS token is minted per session; the key itself never leaves this process).

HTTP errors come back in Azure's shape (`{"Message": "ErrorCode:{code};{text}"}` plus the
`iothub-errorcode` header) and are raised as the matching `TetherError`, so commands report them
exactly like local errors.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from tether.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    TetherError,
    Throttled,
    Unauthorized,
)
from tether.registry.models import Device, Module
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token
from tether.storage.base import AuditRecord, PolicyRecord

Verify = ssl.SSLContext | str | bool  # httpx's `verify`: a context, a CA file, or system CAs on/off

API_VERSION = "2021-04-12"
TOKEN_TTL_S = 3600
PAGE = 1000  # the hub's maximum `top`
TIMEOUT_S = 30.0

_ERRORS: dict[int, type[TetherError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    429: Throttled,
}


def _seg(value: str) -> str:
    """A path segment: device ids may contain characters with meaning in URLs (`?`, `%`, `$`)."""
    return quote(value, safe="")


def error_from_response(response: httpx.Response) -> TetherError:
    """The hub's error (Azure's `{"Message": "ErrorCode:{code};{text}", …}` and the `iothub-errorcode`
    header) as a `TetherError` with the same code and text."""
    code: str | None = response.headers.get("iothub-errorcode") or None
    message = f"HTTP {response.status_code} {response.reason_phrase}"
    field: str | None = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        text = body.get("Message")
        if isinstance(text, str) and text.startswith("ErrorCode:") and ";" in text:
            head, _, text = text.partition(";")
            code = code or head.removeprefix("ErrorCode:") or None
        if isinstance(text, str) and text:
            message = text
        field = body.get("field") if isinstance(body.get("field"), str) else None
    cls = _ERRORS.get(response.status_code, TetherError)
    return cls(message, code=code, field=field)


class RemoteBackend:
    """`Backend` over the hub's REST API."""

    mode = "remote"

    def __init__(self, hub_url: str, connection_string: str, *, verify: Verify = True) -> None:
        self._transport(hub_url, verify)
        self._cs: ServiceConnectionString | None = ServiceConnectionString.parse(connection_string)

    def _transport(self, hub_url: str, verify: Verify) -> None:
        self._base = hub_url.rstrip("/")
        if not self._base.startswith(("http://", "https://")):
            raise BadRequest("--hub-url must start with http:// or https://", field="hub_url")
        self._verify = verify
        self._sni: str | None = None  # verify the certificate for this name instead of the URL's host
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return self._base

    @property
    def hostname(self) -> str:
        assert self._cs is not None, "no credentials yet"
        return self._cs.host_name

    def _token(self) -> str:
        assert self._cs is not None, "no credentials yet"
        return build_token(
            self._cs.host_name,
            self._cs.shared_access_key,
            int(time.time()) + TOKEN_TTL_S,
            policy_name=self._cs.shared_access_key_name,
        )

    async def open(self) -> None:
        self._client = httpx.AsyncClient(
            base_url=self._base,
            verify=self._verify,
            timeout=TIMEOUT_S,
            headers={"Authorization": self._token(), "Accept": "application/json"},
            params={"api-version": API_VERSION},
            event_hooks={"request": [self._name_server]} if self._sni else {},
        )

    async def _name_server(self, request: httpx.Request) -> None:
        request.extensions["sni_hostname"] = self._sni

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "backend not open"
        return self._client

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    async def _device(self, method: str, path: str, **kwargs: Any) -> Device:
        response = await self._request(method, path, **kwargs)
        return Device.model_validate(response.json())

    # devices ---------------------------------------------------------------------------------
    async def create_device(self, device_id: str, body: dict[str, Any]) -> Device:
        return await self._device("PUT", f"/devices/{_seg(device_id)}", json=body)

    async def get_device(self, device_id: str) -> Device:
        return await self._device("GET", f"/devices/{_seg(device_id)}")

    async def list_devices(self, top: int) -> list[Device]:
        devices: list[Device] = []
        headers: dict[str, str] = {}
        while len(devices) < top:
            want = min(PAGE, top - len(devices))
            response = await self._request("GET", "/devices", params={"top": want}, headers=headers)
            page = [Device.model_validate(d) for d in response.json()]
            devices.extend(page)
            continuation = response.headers.get("x-ms-continuation")
            if not continuation or len(page) < want:
                break
            headers = {"x-ms-continuation": continuation}
        return devices

    async def replace_device(self, device_id: str, body: dict[str, Any], etag: str | None) -> Device:
        return await self._device(
            "PUT", f"/devices/{_seg(device_id)}", json=body, headers={"If-Match": _if_match(etag)}
        )

    async def delete_device(self, device_id: str, etag: str | None) -> None:
        await self._request("DELETE", f"/devices/{_seg(device_id)}", headers={"If-Match": _if_match(etag)})

    async def set_status(self, device_id: str, enabled: bool, reason: str | None) -> Device:
        action = "enable" if enabled else "disable"
        body = {"reason": reason} if reason is not None else {}
        return await self._device("POST", f"/tether/devices/{_seg(device_id)}/{action}", json=body)

    async def regenerate_device_key(self, device_id: str, which: str) -> Device:
        return await self._device(
            "POST", f"/tether/devices/{_seg(device_id)}/regenerate-key", params={"key": which}
        )

    async def import_devices(self, records: Sequence[dict[str, Any]]) -> int:
        content = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        response = await self._request(
            "POST",
            "/tether/devices/import",
            content=content,
            headers={"Content-Type": "application/x-ndjson"},
        )
        return int(response.json()["imported"])

    async def export_devices(self) -> AsyncIterator[Device]:
        async with self.client.stream("GET", "/tether/devices/export") as response:
            if response.status_code >= 400:
                await response.aread()
                raise error_from_response(response)
            async for line in response.aiter_lines():
                if line.strip():
                    yield Device.model_validate_json(line)

    # modules ---------------------------------------------------------------------------------
    async def _module(self, method: str, device_id: str, module_id: str, **kwargs: Any) -> Module:
        path = f"/devices/{_seg(device_id)}/modules/{_seg(module_id)}"
        response = await self._request(method, path, **kwargs)
        return Module.model_validate(response.json())

    async def create_module(self, device_id: str, module_id: str, body: dict[str, Any]) -> Module:
        return await self._module("PUT", device_id, module_id, json=body)

    async def get_module(self, device_id: str, module_id: str) -> Module:
        return await self._module("GET", device_id, module_id)

    async def list_modules(self, device_id: str) -> list[Module]:
        response = await self._request("GET", f"/devices/{_seg(device_id)}/modules")
        return [Module.model_validate(m) for m in response.json()]

    async def replace_module(self, device_id: str, module_id: str, body: dict[str, Any],
                             etag: str | None) -> Module:
        return await self._module("PUT", device_id, module_id, json=body,
                                  headers={"If-Match": _if_match(etag)})

    async def delete_module(self, device_id: str, module_id: str, etag: str | None) -> None:
        await self._request("DELETE", f"/devices/{_seg(device_id)}/modules/{_seg(module_id)}",
                            headers={"If-Match": _if_match(etag)})

    async def regenerate_module_key(self, device_id: str, module_id: str, which: str) -> Module:
        response = await self._request(
            "POST", f"/tether/devices/{_seg(device_id)}/modules/{_seg(module_id)}/regenerate-key",
            params={"key": which})
        return Module.model_validate(response.json())

    # policies --------------------------------------------------------------------------------
    @staticmethod
    def _policy(doc: dict[str, Any]) -> PolicyRecord:
        return PolicyRecord(
            name=doc["keyName"],
            primary_key=doc.get("primaryKey") or "",
            secondary_key=doc.get("secondaryKey") or "",
            permissions=frozenset(doc.get("rights", [])),
        )

    async def list_policies(self, *, keys: bool = False) -> list[PolicyRecord]:
        params = {"keys": "true"} if keys else {}
        response = await self._request("GET", "/tether/policies", params=params)
        return [self._policy(d) for d in response.json()]

    async def get_policy(self, name: str) -> PolicyRecord:
        response = await self._request("GET", f"/tether/policies/{_seg(name)}", params={"keys": "true"})
        return self._policy(response.json())

    async def create_policy(self, name: str, rights: Sequence[str]) -> PolicyRecord:
        response = await self._request("PUT", f"/tether/policies/{_seg(name)}", json={"rights": list(rights)})
        return self._policy(response.json())

    async def delete_policy(self, name: str) -> None:
        await self._request("DELETE", f"/tether/policies/{_seg(name)}")

    async def regenerate_policy_key(self, name: str, which: str) -> PolicyRecord:
        response = await self._request(
            "POST", f"/tether/policies/{_seg(name)}/regenerate-key", params={"key": which}
        )
        return self._policy(response.json())

    # audit -----------------------------------------------------------------------------------
    async def audit(
        self,
        *,
        limit: int,
        since: datetime | None,
        outcome: str | None,
        action_prefix: str | None,
        principal: str | None,
    ) -> list[AuditRecord]:
        params: dict[str, str | int] = {"limit": limit}
        if since is not None:
            params["since"] = since.isoformat()
        if outcome:
            params["outcome"] = outcome
        if action_prefix:
            params["action"] = action_prefix
        if principal:
            params["principal"] = principal
        response = await self._request("GET", "/tether/audit", params=params)
        return [
            AuditRecord(
                time=datetime.fromisoformat(d["time"].replace("Z", "+00:00")),
                action=d["action"],
                outcome=d["outcome"],
                principal=d.get("principal"),
                credential=d.get("credential"),
                reason=d.get("reason"),
                peer=d.get("peer"),
                target=d.get("target"),
                details=d.get("details") or {},
                id=d.get("id"),
            )
            for d in response.json()
        ]


def _if_match(etag: str | None) -> str:
    return f'"{etag}"' if etag else "*"
