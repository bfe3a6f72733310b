"""Remote mode: the same commands against a real hub REST app on 127.0.0.1 (plain HTTP, port 0),
served from a background thread with its own event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tether.api.app import build_app
from tether.config import load_settings
from tether.hub import Hub
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import parse_token, verify_signature

from .conftest import Cli, json_lines


class RunningHub:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hub", daemon=True)
        self.url = ""

    async def _start(self) -> None:
        self.hub = Hub(load_settings(hub={"hostname": "localhost", "data_dir": self.data_dir}))
        await self.hub.open()
        self.runner = web.AppRunner(build_app(self.hub), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.hub.close()

    def __enter__(self) -> RunningHub:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def remote(cli: Cli, owner_cs: str) -> Iterator[tuple[str, str]]:
    """(hub URL, owner connection string) of a hub serving the initialised data dir."""
    with RunningHub(cli.data_dir) as running:
        yield running.url, owner_cs


def test_remote_device_create_and_list(cli: Cli, remote: tuple[str, str]) -> None:
    url, cs = remote
    opts = ("--hub-url", url, "--connection-string", cs)
    created = json.loads(cli(*opts, "device", "create", "rdev1").stdout)
    assert created["deviceId"] == "rdev1"
    assert created["authentication"]["symmetricKey"]["primaryKey"] == "<hidden>"
    cli(*opts, "device", "create", "rdev2", "--disabled")
    listing = cli(*opts, "device", "list").stdout
    assert "rdev1" in listing and "rdev2" in listing
    # the change really reached the hub's storage: local mode sees it too
    assert "rdev1" in cli("device", "list").stdout


def test_remote_mode_from_environment_and_more_commands(cli: Cli, remote: tuple[str, str]) -> None:
    url, cs = remote
    env = {"TETHER_HUB_URL": url, "TETHER_CONNECTION_STRING": cs}
    cli("device", "create", "env1", env=env)
    doc = json.loads(cli("device", "show", "env1", "--show-keys", env=env).stdout)
    key = doc["authentication"]["symmetricKey"]["primaryKey"]
    token = parse_token(cli("token", "device", "env1", env=env).stdout.strip())
    assert token.resource == "localhost/devices/env1" and verify_signature(token, [key])
    cs_out = cli("device", "connection-string", "env1", env=env).stdout.strip()
    assert cs_out.endswith(f"SharedAccessKey={key}")

    cli("device", "disable", "env1", "--reason", "maintenance", env=env)
    assert json.loads(cli("device", "show", "env1", env=env).stdout)["statusReason"] == "maintenance"
    cli("device", "enable", "env1", env=env)
    cli("device", "regenerate-key", "env1", "--key", "primary", env=env)
    assert json.loads(cli("device", "show", "env1", "--show-keys", env=env).stdout)[
        "authentication"]["symmetricKey"]["primaryKey"] != key

    owner_key = ServiceConnectionString.parse(cs).shared_access_key
    assert owner_key not in cli("policy", "list", env=env).stdout
    assert owner_key in cli("policy", "list", "--show-keys", env=env).stdout
    cli("policy", "create", "rops", "--rights", "RegistryRead", env=env)
    assert "rops" in cli("policy", "list", env=env).stdout
    cli("policy", "delete", "rops", env=env)

    lines = cli("export", env=env).stdout.splitlines()
    assert [json.loads(line)["deviceId"] for line in lines] == ["env1"]
    records = json_lines(cli("audit", "--json", "--action", "device.", env=env).stdout)
    assert any(r["principal"] == "policy:iothubowner" and r["target"] == "env1" for r in records)

    cli("device", "delete", "env1", env=env)
    missing = cli("device", "show", "env1", env=env, ok=False)
    assert missing.exit_code == 1 and "env1" in missing.stderr


def test_remote_import_is_all_or_nothing(cli: Cli, remote: tuple[str, str], tmp_path: Path) -> None:
    url, cs = remote
    opts = ("--hub-url", url, "--connection-string", cs)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"deviceId": f"imp{i}"}) + "\n" for i in range(3)))
    assert cli(*opts, "import", str(good)).stdout.strip() == "imported 3 devices"
    again = cli(*opts, "import", str(good), ok=False)
    assert again.exit_code == 1 and "nothing imported" in again.stderr


def test_remote_errors_are_reported_clearly(cli: Cli, remote: tuple[str, str]) -> None:
    url, cs = remote
    bad_cs = f"HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey={'A' * 43}="
    assert bad_cs != cs
    refused = cli("--hub-url", url, "--connection-string", bad_cs, "device", "list", ok=False)
    assert refused.exit_code == 1 and "credential" in refused.stderr
    no_cs = cli("--hub-url", url, "device", "list", ok=False)
    assert no_cs.exit_code == 1 and "connection string" in no_cs.stderr
    down = cli("--hub-url", "http://127.0.0.1:9", "--connection-string", cs, "device", "list", ok=False)
    assert down.exit_code == 1 and "cannot reach" in down.stderr
    monitor = cli("--hub-url", url, "--connection-string", cs, "monitor", "--timeout", "1")
    assert monitor.exit_code == 0 and monitor.stdout.strip() == ""  # no telemetry yet: nothing printed


def test_monitor_explains_the_embedded_stream_is_busy(cli: Cli, remote: tuple[str, str]) -> None:
    result = cli("monitor", "--timeout", "1", ok=False)
    assert result.exit_code == 1
    assert "another process" in result.stderr and "stop the hub" in result.stderr


def test_remote_cli_cannot_obtain_a_key_with_more_rights_than_its_own(cli: Cli,
                                                                     remote: tuple[str, str]) -> None:
    """Issue 14: the CLI goes through REST, so a non-owner connection string cannot print the owner's
    connection string, mint an owner token, or export device keys it could not use anyway."""
    url, cs = remote
    owner = ("--hub-url", url, "--connection-string", cs)
    cli(*owner, "policy", "create", "almostOwner", "--rights",
        "RegistryRead,RegistryReadWrite,ServiceConnect")
    almost_cs = cli(*owner, "policy", "connection-string", "almostOwner").stdout.strip()
    reader_cs = cli(*owner, "policy", "connection-string", "registryRead").stdout.strip()
    almost = ("--hub-url", url, "--connection-string", almost_cs)
    owner_key = ServiceConnectionString.parse(cs).shared_access_key
    for command in (("policy", "connection-string", "iothubowner"), ("token", "policy", "iothubowner"),
                    ("policy", "list", "--show-keys")):
        result = cli(*almost, *command, ok=False)
        assert owner_key not in result.stdout + result.stderr, command
        if command[1] != "list":
            assert result.exit_code == 1 and "DeviceConnect" in result.stderr, (command, result.stderr)
    created = json.loads(cli(*owner, "device", "create", "kdev", "--show-keys").stdout)
    device_key = created["authentication"]["symmetricKey"]["primaryKey"]
    reader = ("--hub-url", url, "--connection-string", reader_cs)
    for command in (("export",), ("device", "connection-string", "kdev"), ("token", "device", "kdev"),
                    ("device", "show", "kdev", "--show-keys")):
        result = cli(*reader, *command, ok=False)
        assert device_key not in result.stdout + result.stderr, command
        if command[0] != "device" or command[1] != "show":
            assert result.exit_code == 1, (command, result.stdout)
