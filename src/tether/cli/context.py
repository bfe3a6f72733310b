"""Per-invocation CLI state: global options, lazily loaded settings, backend choice, error mapping.

Settings are loaded only when a command needs them, so `--help` works even with a broken config.
Every command runs its async body through `run()`, which turns `TetherError` into a red message and
exit code 1, and `ConfigError` into exit code 2 (the message names the setting).

`CliState.backend()` hands the global options to `cli.factory.choose_backend`, the one place that
picks where commands go (a `--hub-url`, the hub running on the data dir, or the data dir itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import typer

from tether.cli.backend import Backend
from tether.cli.factory import choose_backend
from tether.config import ConfigError, Settings, load_settings
from tether.errors import BadRequest, TetherError

T = TypeVar("T")

CONFIG_FILE_NAME = "tether.toml"
ROOT_CERTS = ("root-ca.pem", "root-ca-next.pem")  # the dev root and, during a rollover, the next one


def data_dir_roots(settings: Settings) -> ssl.SSLContext | None:
    """A context trusting the data dir's dev root (and next root during a rollover), if it has one."""
    roots = [settings.pki_dir / name for name in ROOT_CERTS]
    pem = "".join(p.read_text("ascii") for p in roots if p.is_file())
    return ssl.create_default_context(cadata=pem) if pem else None


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

    def backend(self, *, stream: bool = False) -> Backend:
        """The backend for registry/policy/audit commands, chosen by `cli.factory.choose_backend`."""
        return choose_backend(
            hub_url=self.hub_url,
            connection_string=self.connection_string,
            settings=None if self.remote else self.settings(),
            verify=self._verify(),
            stream=stream,
        )

    def require_local(self, what: str) -> Settings:
        """Commands that work on the data dir's files (PKI, CAs, stream) refuse remote mode clearly."""
        if self.remote:
            raise BadRequest(f"{what} needs local mode for now: run it on the hub host without --hub-url")
        return self.settings()

    def _verify(self) -> ssl.SSLContext | bool:
        """CA for HTTPS: --ca-file, else the data dir's dev root(s) when present, else the system's."""
        if self.ca_file is not None:
            if not self.ca_file.is_file():
                raise BadRequest(f"CA file {self.ca_file} does not exist", field="ca_file")
            return ssl.create_default_context(cafile=str(self.ca_file))
        if self.hub_url and not self.hub_url.startswith("https://"):
            return True
        with contextlib.suppress(ConfigError):
            roots = data_dir_roots(self.settings())
            if roots is not None:
                return roots
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
