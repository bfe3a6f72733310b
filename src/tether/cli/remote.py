"""Remote mode: the same operations over a running hub's REST API, authenticated with a service
connection string (a SAS token is minted per session; the key itself never leaves this process).

HTTP errors come back as `{"errorCode", "message"}` and are raised as the matching `TetherError`,
so commands report them exactly like local errors.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
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

if TYPE_CHECKING:
    from pathlib import Path

    from tether.cli.local import LocalBackend
    from tether.config import Settings

Verify = ssl.SSLContext | str | bool  # httpx's `verify`: a context, a CA file, or system CAs on/off

API_VERSION = "2021-04-12"
TOKEN_TTL_S = 3600
PAGE = 1000  # the hub's maximum `top`
TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0
OWNER_POLICY = "iothubowner"

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
    """The hub's JSON error as a `TetherError` with the same code and message."""
    code: str | None = None
    message = f"HTTP {response.status_code} {response.reason_phrase}"
    field: str | None = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        code = body.get("errorCode") or None
        message = str(body.get("message") or message)
        field = body.get("field")
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
        )

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


class RunningHubBackend(RemoteBackend):
    """Local mode while a hub runs on the same data dir: its REST API instead of its storage.

    Writing the database behind a running hub's back would leave it unaware (a disabled device would
    stay connected), so requests go to `https://localhost:{listeners.https_port}`, signed with the data
    dir's owner policy — read from the database the hub has open, which SQLite's WAL allows. When that
    hub does not answer, reads fall back to the data dir (with a warning) and every change is refused
    with `refusal`; `stream` commands (monitor) need the hub itself and fail at once.
    """

    def __init__(self, settings: Settings, *, held: Path, verify: Verify, stream: bool = False) -> None:
        self.settings = settings
        self._held = held  # the stream directory whose lock says a hub runs
        self._stream = stream
        self._transport(f"https://localhost:{settings.listeners.https_port}", verify)
        self._cs = None
        self._local: LocalBackend | None = None
        self.refusal: TetherError | None = None

    @property
    def hostname(self) -> str:
        return self.settings.hub.hostname

    async def open(self) -> None:
        """Reach the hub and say so on stderr; else read locally, or fail for stream commands."""
        import typer

        from tether.cli.local import LocalBackend

        local = LocalBackend(self.settings, ensure_defaults=False)  # read only: the hub owns the data
        try:
            await local.open()
            why = await self._connect(await local.list_policies())
        except BaseException:
            await local.close()
            raise
        if why is None:
            await local.close()
            doing = "following its feed" if self._stream else "using its API"
            typer.echo(f"hub running at {self.url}: {doing}", err=True)
            return
        self.refusal = TetherError(
            f"event stream {self._held} is open in another process (a hub running on data dir "
            f"{self.settings.data_dir}, or a local `tether monitor`), but no hub answers here: {why}. "
            + ("Only that hub can serve its event stream. " if self._stream else
               "Nothing was changed: the running hub would not notice changes made behind its back. ")
            + "Set listeners.https_port to the hub's port, pass --hub-url and --connection-string, "
            "or stop the hub first",
            code="HubUnreachable",
        )
        if self._stream:
            await local.close()
            raise self.refusal
        self._local = local
        typer.secho(f"warning: event stream {self._held} is held by another process but no hub answers "
                    f"here ({why}): reading the data dir directly; changes are refused",
                    fg=typer.colors.YELLOW, err=True)

    async def _connect(self, policies: Sequence[PolicyRecord]) -> str | None:
        """Open the HTTPS client with the owner policy and check the hub answers; else why not."""
        if self.settings.listeners.https_port == 0:
            return "listeners.https_port is 0 (ephemeral), so its address is unknown"
        if not policies:
            return "the database has no shared access policy to sign requests with"
        # iothubowner, else the policy with the most rights (the owner one may have been replaced)
        policy = min(policies, key=lambda p: (p.name != OWNER_POLICY, -len(p.permissions), p.name))
        self._cs = ServiceConnectionString(self.settings.hub.hostname, policy.name, policy.primary_key)
        await super().open()
        try:
            response = await self.client.get("/healthz", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            await super().close()
            detail = str(exc) or type(exc).__name__
            if "CERTIFICATE_VERIFY_FAILED" in detail:
                detail += " (pass the hub's CA with --ca-file)"
            return f"cannot reach {self.url}: {detail}"
        if response.status_code != 200:
            await super().close()
            return f"{self.url}/healthz answered HTTP {response.status_code}"
        return None

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()
            self._local = None
        await super().close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.refusal is not None:  # the reads below were answered locally: this is a change
            raise self.refusal
        return await super()._request(method, path, **kwargs)

    # reads fall back to the data dir when the hub does not answer ------------------------------
    async def get_device(self, device_id: str) -> Device:
        if self._local is not None:
            return await self._local.get_device(device_id)
        return await super().get_device(device_id)

    async def list_devices(self, top: int) -> list[Device]:
        if self._local is not None:
            return await self._local.list_devices(top)
        return await super().list_devices(top)

    async def export_devices(self) -> AsyncIterator[Device]:
        source = self._local.export_devices() if self._local is not None else super().export_devices()
        async for device in source:
            yield device

    async def list_policies(self, *, keys: bool = False) -> list[PolicyRecord]:
        if self._local is not None:
            return await self._local.list_policies(keys=keys)
        return await super().list_policies(keys=keys)

    async def get_policy(self, name: str) -> PolicyRecord:
        if self._local is not None:
            return await self._local.get_policy(name)
        return await super().get_policy(name)

    async def audit(
        self,
        *,
        limit: int,
        since: datetime | None,
        outcome: str | None,
        action_prefix: str | None,
        principal: str | None,
    ) -> list[AuditRecord]:
        if self._local is not None:
            return await self._local.audit(
                limit=limit, since=since, outcome=outcome, action_prefix=action_prefix, principal=principal
            )
        return await super().audit(
            limit=limit, since=since, outcome=outcome, action_prefix=action_prefix, principal=principal
        )
