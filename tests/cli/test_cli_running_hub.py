"""Local mode (no --hub-url) while `tether run` serves the same data dir: commands go through that hub's
API, so it learns of every change — a disabled or deleted device loses its live MQTT connection at once.
If the hub cannot be reached, reads use the data dir (with a warning) and changes are refused; once it
has stopped, local mode works on the data dir directly again."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import pytest

from .conftest import Cli, json_lines

HUB_LINE = "hub running at https://127.0.0.1:{port}: using its API"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reader(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


class HubProcess:
    """`tether --data-dir D run` in a subprocess; its listeners come from the data dir's tether.toml."""

    def __init__(self, data_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli.main", "--data-dir", str(data_dir), "run"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_reader, args=(self.proc.stdout, self.lines), daemon=True).start()
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("Tether hub ready") for line in seen):
            assert self.proc.poll() is None, "hub exited:\n" + "".join(seen)
            try:
                seen.append(self.lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError("hub did not start:\n" + "".join(seen)) from None
        match = re.search(r"\bmqtt\s+listening on 127\.0\.0\.1:(\d+)", "".join(seen))
        assert match, "".join(seen)
        self.mqtt_port = int(match.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Device:
    """A paho 1.6 device on the hub's plain MQTT port, without automatic reconnects."""

    def __init__(self, device_id: str, token: str, port: int) -> None:
        self.client = mqtt.Client(client_id=device_id, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        self.client.username_pw_set(f"localhost/{device_id}/?api-version=2021-04-12", token)
        self.connack: int | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda client, userdata, rc: self.disconnected.set()
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"
        assert self.connack == 0, f"CONNACK {self.connack}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        self.connack = rc
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def https_port(cli: Cli, owner_cs: str) -> int:
    """Listeners on loopback in the data dir's tether.toml, read by `tether run` and the CLI alike."""
    port = free_port()
    with (cli.data_dir / "tether.toml").open("a", encoding="utf-8") as f:
        f.write(f'\n[listeners]\nhost = "127.0.0.1"\nhttps_port = {port}\n'
                'mqtt_port = 0\nmqtt_plain_port = 0\namqp_port = 0\n')
    return port


@pytest.fixture
def hub(cli: Cli, https_port: int) -> Iterator[HubProcess]:
    cli("device", "create", "dev1")  # hub stopped: straight into the data dir
    cli("device", "create", "dev2")
    running = HubProcess(cli.data_dir)
    try:
        yield running
    finally:
        running.stop()


def _token(cli: Cli, device_id: str, port: int) -> str:
    result = cli("token", "device", device_id)
    assert HUB_LINE.format(port=port) in result.stderr
    return result.stdout.strip()


def test_disable_and_delete_drop_live_connections(cli: Cli, hub: HubProcess, https_port: int) -> None:
    hub_line = HUB_LINE.format(port=https_port)
    dev1 = Device("dev1", _token(cli, "dev1", https_port), hub.mqtt_port)
    dev2 = Device("dev2", _token(cli, "dev2", https_port), hub.mqtt_port)
    try:
        disabled = cli("device", "disable", "dev1", "--reason", "stolen")
        assert hub_line in disabled.stderr
        assert dev1.disconnected.wait(2), "the running hub kept the disabled device connected"
        assert not dev2.disconnected.is_set()

        deleted = cli("device", "delete", "dev2")
        assert hub_line in deleted.stderr
        assert dev2.disconnected.wait(2), "the running hub kept the deleted device connected"
    finally:
        dev1.close()
        dev2.close()

    audit = json_lines(cli("audit", "--action", "device.", "--json").stdout)
    changes = {(r["action"], r["target"]): r for r in audit}
    assert changes[("device.disable", "dev1")]["principal"] == "policy:iothubowner"
    assert changes[("device.disable", "dev1")]["details"] == {"reason": "stolen"}
    assert changes[("device.delete", "dev2")]["principal"] == "policy:iothubowner"

    listing = cli("device", "list")
    assert hub_line in listing.stderr
    assert "dev1" in listing.stdout and "disabled" in listing.stdout and "dev2" not in listing.stdout


def test_unreachable_hub_refuses_changes_but_allows_reads(cli: Cli, hub: HubProcess) -> None:
    run_file = cli.data_dir / "run" / "hub.json"
    doc = json.loads(run_file.read_text())
    doc["ports"]["https"] = free_port()  # nobody listens there
    run_file.write_text(json.dumps(doc))
    refused = cli("device", "disable", "dev1", ok=False)
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "another process" in refused.stderr and "Nothing was changed" in refused.stderr
    assert "cannot reach https://127.0.0.1:" in refused.stderr

    shown = cli("device", "show", "dev1")
    assert "reading the data dir directly" in shown.stderr
    assert '"status": "enabled"' in shown.stdout  # the refused disable wrote nothing
    assert not [r for r in json_lines(cli("audit", "--action", "device.disable", "--json").stdout)]


def test_local_mode_uses_the_data_dir_once_the_hub_stopped(cli: Cli, hub: HubProcess) -> None:
    assert hub.stop() == 0
    disabled = cli("device", "disable", "dev1")
    assert "hub running" not in disabled.stderr
    audit = json_lines(cli("audit", "--action", "device.disable", "--json").stdout)
    assert [(r["target"], r["principal"]) for r in audit] == [("dev1", "cli:local")]
    assert "dev1" in cli("device", "list").stdout
