"""A first run as a new user would do it, as a **non-root** user (uid 65534 via `setpriv`), from a fresh
directory: `make run` (= `tether init --if-needed` + `tether run`) with the listener settings given
through the environment, then the README quickstart in a second "shell" with no TETHER_* variable at
all. Port 443 is privileged, so the hub falls back to 8443 and says so in one line.

`make run` installs the runtime dependencies only; the hub and the CLI here run through
`runtime_only.py`, which makes every test-only package unimportable."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from azure.iot.device import IoTHubDeviceClient, Message

from tether.security.connstr import DeviceConnectionString

IP = "127.0.0.81"
NOBODY = 65534
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SETPRIV = shutil.which("setpriv")


def _as_nobody(args: list[str]) -> list[str]:
    assert SETPRIV, "setpriv (util-linux) is needed to run as a non-root user"
    prefix = (
        [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
        if os.getuid() == 0
        else []
    )
    return [*prefix, sys.executable, str(HERE / "runtime_only.py"), *args]


def _env(work: Path, **tether: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_") and k != "REQUESTS_CA_BUNDLE"}
    env.update({"HOME": str(work), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **tether})
    return env


def _reader(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


class Shell:
    """A working directory (a fresh clone's) owned by the non-root user."""

    def __init__(self, work: Path) -> None:
        self.work = work

    def run(
        self, *args: str, env: dict[str, str] | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            _as_nobody(list(args)),
            cwd=self.work,
            env=env or _env(self.work),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if ok:
            assert result.returncode == 0, f"tether {' '.join(args)}: {result.returncode}\n{result.stderr}"
        return result


# Whether an unprivileged process may bind 443 on this host (Linux: net.ipv4.ip_unprivileged_port_start).
PRIVILEGED_443 = (
    int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) > 443
    if Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").exists()
    else True
)


@pytest.fixture
def work() -> Iterator[Path]:
    """A fresh directory the non-root user owns (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="tether-first-run-"))
    base.chmod(0o755)
    work = base / "clone"
    work.mkdir()
    if os.getuid() == 0:
        os.chown(work, NOBODY, NOBODY)
    try:
        yield work
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def hub(work: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Shell 1: `make run` with the hub's address given through the environment."""
    env = _env(work, TETHER_HUB__HOSTNAME=IP, TETHER_LISTENERS__HOST=IP)
    shell = Shell(work)
    init = shell.run("init", "--if-needed", env=env)
    assert init.stdout.startswith(f"HostName={IP};SharedAccessKeyName=iothubowner;")
    proc = subprocess.Popen(
        _as_nobody(["run"]), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while not any(line.startswith("Tether hub ready") for line in seen):
            assert proc.poll() is None, "hub exited:\n" + "".join(seen)
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError("hub did not start:\n" + "".join(seen)) from None
        yield proc, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="privileged ports and setpriv are Linux")
def test_make_run_then_quickstart_as_a_non_root_user(
    work: Path, hub: tuple[subprocess.Popen[str], str]
) -> None:
    proc, output = hub
    port = 8443 if PRIVILEGED_443 else 443
    warnings = [line for line in output.splitlines() if "443" in line and "WARNING" in line]
    if PRIVILEGED_443:  # as non-root, 443 is refused: one warning line says what to do
        assert len(warnings) == 1, output
        assert "setcap cap_net_bind_service" in warnings[0] and "ip_unprivileged_port_start" in warnings[0]
    else:
        assert warnings == [], output
    assert re.search(rf"https\s+listening on {re.escape(IP)}:{port}", output), output
    data = work / "tether-data"
    saved = (data / "tether.toml").read_text()
    assert f'hostname = "{IP}"' in saved and f'host = "{IP}"' in saved  # init saved what it was given
    assert json.loads((data / "run" / "hub.json").read_text())["ports"]["https"] == port

    # Shell 2: the README quickstart, no TETHER_* variable set.
    shell = Shell(work)
    created = shell.run("device", "create", "thermostat-1")
    assert f"hub running at https://{IP}:{port}: using its API" in created.stderr
    cs = shell.run("device", "connection-string", "thermostat-1").stdout.strip()
    assert DeviceConnectionString.parse(cs).host_name == IP
    token = shell.run("token", "device", "thermostat-1", "--ttl", "3600").stdout.strip()
    assert token.startswith("SharedAccessSignature ")

    client = IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=(data / "pki" / "root-ca.pem").read_text(), connection_retry=False
    )
    try:
        client.connect()
        msg = Message(
            '{"temperature": 21.5}',
            message_id="m-1",
            content_type="application/json",
            content_encoding="utf-8",
        )
        msg.custom_properties["zone"] = "kitchen"
        client.send_message(msg)
    finally:
        client.shutdown()
    monitored = shell.run(
        "monitor",
        "--device",
        "thermostat-1",
        "--from-start",
        "--max-events",
        "1",
        "--timeout",
        "60",
        "--compact",
    )
    event = json.loads(monitored.stdout.splitlines()[0])["event"]
    assert event["payload"] == {"temperature": 21.5}
    assert event["properties"]["application"] == {"zone": "kitchen"}
    assert proc.poll() is None


@pytest.mark.skipif(
    sys.platform != "linux" or not PRIVILEGED_443,
    reason="443 is privileged only on Linux with the default ip_unprivileged_port_start",
)
def test_without_a_fallback_a_refused_443_names_the_setting(work: Path) -> None:
    env = _env(
        work,
        TETHER_HUB__HOSTNAME="127.0.0.82",
        TETHER_LISTENERS__HOST="127.0.0.82",
        TETHER_LISTENERS__HTTPS_FALLBACK_PORT="0",
    )
    shell = Shell(work)
    shell.run("init", "--if-needed", env=env)
    run = shell.run("run", env=env, ok=False)
    assert run.returncode == 2, run.stderr
    assert "listeners.https_port" in run.stderr and "ip_unprivileged_port_start" in run.stderr


def test_make_run_installs_runtime_dependencies_only(tmp_path: Path) -> None:
    """`make run` installs `.` (what runtime_only.py shows is enough); `make test` adds `.[test]`."""
    make = shutil.which("make")
    assert make, "make is needed (the project's two commands are make targets)"
    venv = f"VENV={tmp_path / 'venv'}"

    def plan(target: str) -> str:
        return subprocess.run(
            [make, "-n", target, venv], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    run = plan("run")
    assert "pip install -q -e .\n" in run and "[test]" not in run and "tether run" in run
    assert "pip install -q -e '.[test]'" in plan("pytest")
