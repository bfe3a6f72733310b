"""Local mode while a hub runs on the same data dir: that hub's REST API instead of its storage.

How a running hub is found: the data dir's embedded event stream is locked by a live process
(`held_stream`), and the hub's run file (`tether.runfile`, `{data_dir}/run/hub.json`) says where its
HTTPS listener really is — `listeners.host` (a wildcard means loopback) and the port it bound, which
is not the configured one when the hub fell back from 443 or bound an ephemeral port. Without a run
file (an older hub) the settings' `listeners.host` and `https_port` are used. The certificate is
verified for `hub.hostname` (the name the hub's certificate is issued for) whatever address is dialled.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from tether.cli.local import LocalBackend
from tether.cli.remote import RemoteBackend, Verify
from tether.config import Settings
from tether.errors import TetherError
from tether.registry.models import Device
from tether.runfile import Listening, dial_host, read_run_file
from tether.security.connstr import ServiceConnectionString
from tether.storage.base import AuditRecord, PolicyRecord

__all__ = ["STREAM_LOCK_FILE", "RunningHubBackend", "held_stream", "hub_url"]

STREAM_LOCK_FILE = "LOCK"  # `LocalEventStream` holds an flock on it while the stream is open
PROBE_TIMEOUT_S = 5.0
OWNER_POLICY = "iothubowner"


def held_stream(settings: Settings) -> Path | None:
    """The embedded event stream's directory when another process holds it open: a hub running on
    this data dir (or a local `tether monitor`). None for NATS streams and on Windows (no lock)."""
    if sys.platform == "win32":
        return None
    import fcntl

    parts = urlsplit(settings.stream_url)
    if parts.scheme != "file":
        return None
    directory = Path(unquote(parts.path))
    try:
        fd = os.open(directory / STREAM_LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no stream yet: no hub has ever run here
    try:
        # Shared and released at once: only tells whether an exclusive holder exists.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return directory
    except OSError:
        return None
    finally:
        os.close(fd)  # releases our shared lock too
    return None


def hub_url(settings: Settings, listening: Listening | None) -> str | None:
    """The running hub's HTTPS base URL: from its run file, else from the settings; None when the
    port is unknown (ephemeral in the settings and no run file)."""
    if listening is not None and listening.https_url is not None:
        return listening.https_url
    if settings.listeners.https_port == 0:
        return None
    host = dial_host(settings.listeners.host)
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{settings.listeners.https_port}"


def _certificate_name(hostname: str) -> str:
    """`hub.hostname` without a `:port` (IPv6 literals keep their colons)."""
    if hostname.startswith("["):
        return hostname[1:].split("]", 1)[0]
    return hostname.rsplit(":", 1)[0] if hostname.count(":") == 1 else hostname


class RunningHubBackend(RemoteBackend):
    """Local mode while a hub runs on the same data dir: its REST API instead of its storage.

    Writing the database behind a running hub's back would leave it unaware (a disabled device would
    stay connected), so requests go to the hub's HTTPS listener (see the module docstring), signed
    with the data dir's owner policy — read from the database the hub has open, which SQLite's WAL
    allows. When that hub does not answer, reads fall back to the data dir (with a warning) and every
    change is refused with `refusal`; `stream` commands (monitor) need the hub itself and fail at once.
    """

    def __init__(self, settings: Settings, *, held: Path, verify: Verify, stream: bool = False) -> None:
        self.settings = settings
        self._held = held  # the stream directory whose lock says a hub runs
        self._stream = stream
        self._listening = read_run_file(settings.data_dir)
        url = hub_url(settings, self._listening)
        self._transport(url or "https://localhost:0", verify)
        self._sni = _certificate_name(settings.hub.hostname)
        self._port_known = url is not None
        self._cs = None
        self._local: LocalBackend | None = None
        self.refusal: TetherError | None = None

    @property
    def hostname(self) -> str:
        return self.settings.hub.hostname

    async def open(self) -> None:
        """Reach the hub and say so on stderr; else read locally, or fail for stream commands."""
        import typer

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
            + "Pass --hub-url and --connection-string, or stop the hub first",
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
        if not self._port_known:
            return ("it wrote no run file and listeners.https_port is 0 (ephemeral), so its address is "
                    "unknown")
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
