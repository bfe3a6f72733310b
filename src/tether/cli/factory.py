"""The one place that chooses where a CLI command goes (a backend chosen by a factory).

- `--hub-url` (or `TETHER_HUB_URL`): the REST API of that hub, signed with the given connection string;
- else, while a hub runs on the data dir (it holds the embedded stream's lock): that hub's API
  (`cli.running`), so it sees every change — e.g. drops a disabled device's connections;
- else the data dir's storage through the hub's own services (`cli.local`).
"""

from __future__ import annotations

from tether.cli.backend import Backend
from tether.cli.local import LocalBackend
from tether.cli.remote import RemoteBackend, Verify
from tether.cli.running import RunningHubBackend, held_stream
from tether.config import Settings
from tether.errors import BadRequest

__all__ = ["choose_backend"]


def choose_backend(*, hub_url: str | None, connection_string: str | None, settings: Settings | None,
                   verify: Verify, stream: bool = False) -> Backend:
    """`settings` is needed only in local mode (no `hub_url`). `stream` commands (monitor) need a
    running hub itself when one holds the embedded stream (see `RunningHubBackend`)."""
    if hub_url:
        if not connection_string:
            raise BadRequest(
                "--hub-url needs a service connection string: pass --connection-string "
                "or set TETHER_CONNECTION_STRING",
                field="connection_string",
            )
        return RemoteBackend(hub_url, connection_string, verify=verify)
    assert settings is not None, "local mode needs settings"
    held = held_stream(settings)
    if held is not None:
        return RunningHubBackend(settings, held=held, verify=verify, stream=stream)
    return LocalBackend(settings)
