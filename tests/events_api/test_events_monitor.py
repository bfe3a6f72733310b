"""`tether monitor` against a real running hub: remote mode over the SSE feed, and local mode falling
back to the hub that holds the embedded stream (HTTPS on the configured port, data dir CA)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from events_helpers import append
from typer.testing import CliRunner, Result

from tether.api.app import build_app
from tether.api.event_routes import CONSUMERS_KEY
from tether.cli.main import app as cli_app
from tether.config import load_settings
from tether.hub import Hub
from tether.security.tls import TlsContextFactory, start_tls_server

T = TypeVar("T")


class Cli:
    """`tether --data-dir {dir} …` in-process, with the caller's TETHER_* variables hidden."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def __call__(self, *args: str, env: Mapping[str, str] | None = None, ok: bool = True) -> Result:
        clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TETHER_")}
        clean.update({"TETHER_CONFIG": None, "TETHER_HUB_URL": None, "TETHER_CONNECTION_STRING": None,
                      "TETHER_CA_FILE": None})
        clean.update(env or {})
        result = CliRunner().invoke(cli_app, ["--data-dir", str(self.data_dir), *args], env=clean)
        if ok:
            assert result.exit_code == 0, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        return result


class RunningHub:
    """A hub serving the REST app with the event routes from a background thread: plain HTTP on an
    ephemeral port, or HTTPS (dev PKI of the data dir) on `https_port`."""

    def __init__(self, data_dir: Path, https_port: int | None = None) -> None:
        self.data_dir, self.https_port = data_dir, https_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hub", daemon=True)
        self.url = ""
        self.tls_server: asyncio.Server | None = None

    async def _start(self) -> None:
        listeners = {"https_port": self.https_port} if self.https_port else {}
        settings = load_settings(hub={"hostname": "localhost", "data_dir": self.data_dir},
                                 listeners=listeners)
        self.hub = Hub(settings)
        await self.hub.open()
        self.runner = web.AppRunner(build_app(self.hub), access_log=None)
        await self.runner.setup()
        if self.https_port is None:
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            host, port = self.runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
        else:
            assert self.runner.server is not None
            tls = TlsContextFactory(settings.tls, settings.cert_file, settings.key_file,
                                    settings.tls.chain_file)
            self.tls_server = await start_tls_server(self.runner.server, "127.0.0.1", self.https_port, tls)
            self.url = f"https://localhost:{self.https_port}"

    async def _stop(self) -> None:
        if self.tls_server is not None:
            self.tls_server.close()
        await self.runner.cleanup()
        await self.hub.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def feeds(self) -> int:
        return self.runner.app[CONSUMERS_KEY].feeds

    def __enter__(self) -> RunningHub:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


@pytest.fixture
def owner_cs(cli: Cli) -> str:
    return cli("init").stdout.strip()


@pytest.fixture
def running(cli: Cli, owner_cs: str) -> Iterator[RunningHub]:
    with RunningHub(cli.data_dir) as hub:
        yield hub


SAMPLES: list[tuple[str, bytes, dict[str, str], dict[str, str]]] = [
    ("sensor-1", b'{"temp": 21.5}', {"alert": "high"},
     {"message-id": "m1", "content-type": "application/json", "iothub-connection-device-id": "sensor-1"}),
    ("sensor-2", b"plain text", {}, {"message-id": "m2"}),
    ("sensor-1", b"\xff\x00", {}, {"message-id": "m3"}),
]


def append_samples(hub: RunningHub) -> None:
    for device, body, props, system in SAMPLES:
        hub.call(append(hub.hub, device, body, props=props, system=system))


def by_position(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e["event"]["annotations"]["x-opt-partition-id"],
                                         e["event"]["annotations"]["x-opt-sequence-number"]))


def test_remote_monitor_prints_n_events_then_exits(cli: Cli, owner_cs: str) -> None:
    with RunningHub(cli.data_dir) as hub:
        append_samples(hub)
        remote = cli("--hub-url", hub.url, "--connection-string", owner_cs, "monitor", "--from-start",
                     "--max-events", "3", "--compact")
    events = lines(remote.stdout)
    assert len(events) == 3
    by_id = {e["event"]["properties"]["system"]["message-id"]: e["event"] for e in events}
    first = by_id["m1"]
    assert first["origin"] == "sensor-1" and first["payload"] == {"temp": 21.5}
    assert first["properties"]["application"] == {"alert": "high"}
    assert first["annotations"]["iothub-connection-device-id"] == "sensor-1"
    assert isinstance(first["annotations"]["x-opt-enqueued-time"], int)
    assert by_id["m2"]["payload"] == "plain text"
    assert (by_id["m3"]["payload"], by_id["m3"]["payload_encoding"]) == ("/wA=", "base64")
    # the hub is stopped now: local mode reads the same stream and prints the very same documents
    local = cli("monitor", "--from-start", "--max-events", "3", "--compact")
    assert by_position(lines(local.stdout)) == by_position(events)


def test_remote_monitor_follows_live_events(cli: Cli, running: RunningHub, owner_cs: str) -> None:
    running.call(append(running.hub, "early", "before monitor started"))
    results: list[Result] = []
    worker = threading.Thread(target=lambda: results.append(cli(
        "--hub-url", running.url, "--connection-string", owner_cs, "monitor", "--max-events", "2",
        "--timeout", "20", "--compact")))
    worker.start()
    deadline = time.monotonic() + 15
    while running.feeds == 0:
        assert time.monotonic() < deadline and worker.is_alive(), results and results[0].stderr
        time.sleep(0.05)
    running.call(append(running.hub, "live-1", '{"n": 1}'))
    running.call(append(running.hub, "live-2", '{"n": 2}'))
    worker.join(20)
    assert not worker.is_alive()
    assert sorted(e["event"]["origin"] for e in lines(results[0].stdout)) == ["live-1", "live-2"]


def test_remote_monitor_reports_a_hub_shutdown(cli: Cli, owner_cs: str) -> None:
    results: list[Result] = []
    with RunningHub(cli.data_dir) as hub:
        worker = threading.Thread(target=lambda: results.append(cli(
            "--hub-url", hub.url, "--connection-string", owner_cs, "monitor", ok=False)))
        worker.start()
        deadline = time.monotonic() + 15
        while hub.feeds == 0:
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.05)
    worker.join(10)
    assert not worker.is_alive()
    assert results[0].exit_code == 1 and "hub ended the feed: hub shutting down" in results[0].stderr


def test_remote_monitor_device_filter_and_idle_timeout(cli: Cli, running: RunningHub,
                                                       owner_cs: str) -> None:
    append_samples(running)
    began = time.monotonic()
    out = cli("--hub-url", running.url, "--connection-string", owner_cs, "monitor", "--from-start",
              "--device", "sensor-2", "--timeout", "1", "--compact").stdout
    assert time.monotonic() - began < 10
    assert [e["event"]["origin"] for e in lines(out)] == ["sensor-2"]


def test_remote_monitor_errors_are_clear(cli: Cli, running: RunningHub, owner_cs: str) -> None:
    opts = ("--hub-url", running.url, "--connection-string", owner_cs)
    unknown = cli(*opts, "monitor", "--consumer-group", "nobody", "--timeout", "1", ok=False)
    assert unknown.exit_code == 1 and "nobody" in unknown.stderr
    read_only = cli("policy", "connection-string", "registryRead").stdout.strip()
    refused = cli("--hub-url", running.url, "--connection-string", read_only, "monitor", "--timeout", "1",
                  ok=False)
    assert refused.exit_code == 1 and "ServiceConnect" in refused.stderr


def test_local_monitor_falls_back_to_the_running_hub(cli: Cli, owner_cs: str) -> None:
    port = free_port()
    env = {"TETHER_LISTENERS__HTTPS_PORT": str(port)}
    with RunningHub(cli.data_dir, https_port=port) as hub:
        append_samples(hub)
        result = cli("monitor", "--from-start", "--max-events", "3", "--compact", env=env)
        deadline = time.monotonic() + 5  # the hub notices the CLI left, over TLS too
        while hub.feeds:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert f"hub running at https://127.0.0.1:{port}: following its feed" in result.stderr
    assert sorted(e["event"]["properties"]["system"]["message-id"] for e in lines(result.stdout)) == [
        "m1", "m2", "m3"]


def test_local_monitor_without_a_reachable_hub_keeps_the_clear_error(cli: Cli, running: RunningHub) -> None:
    env = {"TETHER_LISTENERS__HTTPS_PORT": str(free_port())}  # the hub serves plain HTTP elsewhere
    result = cli("monitor", "--timeout", "1", env=env, ok=False)
    assert result.exit_code == 1
    assert "another process" in result.stderr and "stop the hub" in result.stderr
    assert "cannot reach https://127.0.0.1:" in result.stderr
