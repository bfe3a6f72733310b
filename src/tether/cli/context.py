"""Per-invocation CLI state: global options, lazily loaded settings, backend choice, error mapping.

Settings are loaded only when a command needs them, so `--help` works even with a broken config.
Every command runs its async body through `run()`, which turns `TetherError` into a red message and
exit code 1, and `ConfigError` into exit code 2 (the message names the setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from tether.config import ConfigError, Settings, load_settings
from tether.errors import BadRequest, TetherError

if TYPE_CHECKING:
    from tether.cli.backend import Backend

T = TypeVar("T")

LOCAL_ACTOR = "cli:local"
CONFIG_FILE_NAME = "tether.toml"


@dataclass
class CliState:
    """What the global options selected; shared by every command through `ctx.obj`."""

    config: Path | None = None
    data_dir: Path | None = None
    hub_url: str | None = None
    connection_string: str | None = None
    ca_file: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        """Remote mode when a hub URL is given (flag or `TETHER_HUB_URL`)."""
        return bool(self.hub_url)

    def settings(self) -> Settings:
        """Load and validate settings once; `{data_dir}/tether.toml` is used when no config is named."""
        if self._settings is not None:
            return self._settings
        if self.config is not None:
            if not self.config.is_file():
                raise ConfigError(f"invalid setting config: file {self.config} does not exist")
            os.environ["TETHER_CONFIG"] = str(self.config)
        overrides: dict[str, Any] = {}
        if self.data_dir is not None:
            overrides["hub"] = {"data_dir": self.data_dir}
        settings = load_settings(**overrides)
        if not os.environ.get("TETHER_CONFIG"):
            candidate = settings.data_dir / CONFIG_FILE_NAME
            if candidate.is_file():
                # The data dir's own config (written by `tether init`) applies when none is named.
                os.environ["TETHER_CONFIG"] = str(candidate)
                settings = load_settings(**overrides)
        self._settings = settings
        return settings

    def forget_settings(self) -> None:
        """Reload on next use (after `init` wrote a config file)."""
        self._settings = None

    def backend(self) -> Backend:
        """The backend for registry/policy/audit commands: REST when a hub URL is set, else local."""
        if self.remote:
            from tether.cli.remote import RemoteBackend

            if not self.connection_string:
                raise BadRequest(
                    "--hub-url needs a service connection string: pass --connection-string "
                    "or set TETHER_CONNECTION_STRING",
                    field="connection_string",
                )
            assert self.hub_url is not None
            return RemoteBackend(self.hub_url, self.connection_string, verify=self._verify())
        from tether.cli.local import LocalBackend

        return LocalBackend(self.settings())

    def require_local(self, what: str) -> Settings:
        """Commands that work on the data dir's files (PKI, CAs, stream) refuse remote mode clearly."""
        if self.remote:
            raise BadRequest(f"{what} needs local mode for now: run it on the hub host without --hub-url")
        return self.settings()

    def _verify(self) -> str | bool:
        """CA bundle for HTTPS: --ca-file, else the data dir's dev root CA when present, else system."""
        if self.ca_file is not None:
            if not self.ca_file.is_file():
                raise BadRequest(f"CA file {self.ca_file} does not exist", field="ca_file")
            return str(self.ca_file)
        if self.hub_url and self.hub_url.startswith("https://"):
            with contextlib.suppress(ConfigError):
                root = self.settings().pki_dir / "root-ca.pem"
                if root.is_file():
                    return str(root)
        return True


def state_of(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):  # a sub-app invoked on its own (tests) gets default state
        obj = CliState()
        ctx.find_root().obj = obj
    return obj


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` in red on stderr and return the Exit to raise."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map Tether's error types to exit codes: 1 for operational errors, 2 for bad settings."""
    import httpx

    try:
        yield
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    except TetherError as exc:
        raise fail(f"error: {exc.message}", 1) from None
    except httpx.HTTPError as exc:
        detail = str(exc) or type(exc).__name__
        if "CERTIFICATE_VERIFY_FAILED" in detail:
            detail += " (pass the hub's CA with --ca-file)"
        raise fail(f"error: cannot reach the hub: {detail}", 1) from None
    except OSError as exc:
        raise fail(f"error: {exc}", 1) from None


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run one async command body with the CLI's error mapping."""
    with cli_errors():
        return asyncio.run(_call(fn))


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def with_backend(state: CliState, fn: Callable[[Backend], Awaitable[T]]) -> T:
    """Open the selected backend, run `fn` with it, always close it."""

    async def body() -> T:
        backend = state.backend()
        try:
            await backend.open()
            return await fn(backend)
        finally:
            await backend.close()

    return run(body)
