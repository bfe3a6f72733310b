"""The brokers under test, each started (or found) by the bench: Tether, Mosquitto and amqtt.

- Tether: `tether run` as a subprocess on a temp data dir, with the dev PKI, a TOML config (free
  ports on 127.0.0.1 for MQTT/TLS, plain MQTT and HTTPS) and devices provisioned beforehand through
  the registry's bulk import. `TetherHub` is also what the durability and abuse tests start.
- Mosquitto: the system one on 127.0.0.1:1883 for plain MQTT, plus one the bench starts for TLS on a
  free port with Tether's dev server certificate.
- amqtt: installed into a bench-only venv (`bench/.venv-amqtt`, created on first use, never the
  project venv) and started on free ports with a tiny YAML config.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AMQTT_VENV = Path(__file__).resolve().parent / ".venv-amqtt"
BENCH_KEY = base64.b64encode(b"tether-bench-shared-device-key!!").decode()
HOSTNAME = "localhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_LINE = "Tether hub ready"  # what `tether run` prints once every listener is up


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Broker:
    name: str
    host: str
    plain_port: int | None
    tls_port: int | None
    ca_file: Path | None
    pid: int | None
    auth: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    proc: subprocess.Popen[Any] | None = None

    def spec(self, tls: bool) -> dict[str, Any]:
        port = self.tls_port if tls else self.plain_port
        if port is None:
            raise RuntimeError(f"{self.name} has no {'TLS' if tls else 'plain'} listener")
        return {"host": self.host, "port": port, "tls": tls, "ca_file": str(self.ca_file) if tls else None,
                "server_hostname": "localhost", "auth": self.auth}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ------------------------------------------------------------------------------------------ Tether


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


class TetherHub:
    """A `tether run` process on its own data dir: prepare once, start/kill/restart as often as needed."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", limits: dict[str, Any] | None = None,
                 plain: bool = True, stdlib_loop: bool = False, profile_out: Path | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.preexec = preexec  # runs in the child before exec, e.g. to set resource limits
        self.host = host
        self.config = self.data_dir / "bench.toml"
        self.limits = {"device_messages_per_second": 1_000_000.0, **(limits or {})}
        self.plain = plain
        self.stdlib_loop = stdlib_loop
        self.profile_out = profile_out
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.service_connection_string = ""
        self.ca_file = self.data_dir / "pki" / "root-ca.pem"

    def prepare(self, device_ids: list[str], key: str = BENCH_KEY) -> None:
        """Data dir, config, dev PKI, default policies and the devices (bulk import), hub not running."""
        import asyncio

        from tether.config import load_settings
        from tether.hub import Hub
        from tether.security import pki

        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        listeners: dict[str, Any] = {"host": self.host, "mqtt_port": free_port(self.host),
                                     "https_port": free_port(self.host), "amqp_port": free_port(self.host)}
        if self.plain:
            listeners["mqtt_plain_port"] = free_port(self.host)
        self.config.write_text(_toml({
            "hub": {"hostname": HOSTNAME, "data_dir": str(self.data_dir)},
            "listeners": listeners,
            "limits": self.limits,
        }))
        pki.init_pki(self.data_dir / "pki", ["localhost"], sorted({"127.0.0.1", self.host}))

        async def provision() -> None:
            settings = load_settings(hub={"hostname": HOSTNAME, "data_dir": self.data_dir})
            async with Hub(settings) as hub:
                records = [{"deviceId": d, "authentication": {"type": "sas", "symmetricKey": {
                    "primaryKey": key, "secondaryKey": key}}} for d in device_ids]
                for i in range(0, len(records), 5000):
                    await hub.registry.import_devices(records[i : i + 5000], actor="bench")
                # `tether run` never prints the owner key: read it here, as `tether init` would show it
                self.service_connection_string = await hub.service_connection_string()

        asyncio.run(provision()) if not _loop_running() else _run_in_thread(provision)

    def command(self) -> list[str]:
        if self.profile_out is not None:
            return [sys.executable, str(Path(__file__).with_name("profile_hub.py")), str(self.profile_out)]
        if self.stdlib_loop:  # `tether run` uses uvloop when installed; this measures the stdlib loop
            code = ("import asyncio; from tether.config import load_settings; "
                    "from tether.server import serve; asyncio.run(serve(load_settings()))")
            return [sys.executable, "-c", code]
        return [sys.executable, "-m", "tether.cli.main", "--config", str(self.config), "run"]

    def start(self, timeout: float = 60.0) -> None:
        out = (self.data_dir / "hub.out").open("wb")
        err = (self.data_dir / "hub.err").open("ab")
        env = dict(os.environ, TETHER_CONFIG=str(self.config))
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=err, env=env, cwd=str(self.data_dir),
                                     preexec_fn=self.preexec)
        out.close()
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = (self.data_dir / "hub.out").read_text(errors="replace")
            if READY_LINE in text and text.endswith("\n"):
                self._parse(text)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"tether run exited {self.proc.returncode}: {self.stderr_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"tether run did not start: {self.stderr_tail()}")

    def _parse(self, text: str) -> None:
        self.ports = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[1:3] == ["listening", "on"]:
                self.ports[parts[0]] = int(parts[3].rsplit(":", 1)[1])

    def stderr_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir / "hub.err").read_text(errors="replace")[-n:]
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def service_token(self, ttl: int = 7200) -> str:
        from tether.security.connstr import ServiceConnectionString
        from tether.security.sas import build_token

        cs = ServiceConnectionString.parse(self.service_connection_string)
        expiry = int(time.time()) + ttl
        return build_token(cs.host_name, cs.shared_access_key, expiry, cs.shared_access_key_name)

    def broker(self) -> Broker:
        sse = {"url": f"https://{self.host}:{self.ports['https']}/tether/events/stream",
               "ca_file": str(self.ca_file), "token": self.service_token()}
        return Broker("tether", self.host, self.ports.get("mqtt"), self.ports.get("mqtts"), self.ca_file,
                      self.pid, {"kind": "sas", "hostname": HOSTNAME, "key": BENCH_KEY, "sse": sse},
                      "durable: PUBACK after fsync (group commit); consumer: SSE /tether/events/stream",
                      self.proc)


def _loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_in_thread(fn: Any) -> None:
    import asyncio
    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------- Mosquitto


def system_mosquitto() -> Broker | None:
    """The machine's Mosquitto on 127.0.0.1:1883 (plain only), when it answers."""
    try:
        wait_port("127.0.0.1", 1883, timeout=1)
    except (TimeoutError, OSError):
        return None
    pid = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(Path("/run/mosquitto/mosquitto.pid").read_text().strip())
    conf = Path("/etc/mosquitto/mosquitto.conf")
    persistence = "persistence true" in conf.read_text() if conf.exists() else False
    notes = ("system mosquitto 2.0 (" + ("persistence true: in-memory, saved every 1800 s, no fsync per msg"
                                         if persistence else "no persistence") + ")")
    return Broker("mosquitto", "127.0.0.1", 1883, None, None, pid, {"kind": "none"}, notes)


def start_mosquitto_tls(workdir: Path, cert: Path, key: Path, ca: Path) -> Broker:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"certfile {cert}\nkeyfile {key}\ncafile {ca}\n"
        "allow_anonymous true\n"
        f"persistence true\npersistence_location {workdir}/\n"
        "user root\n"
        "log_dest none\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=(workdir / "mosquitto.err").open("wb"))
    wait_port("127.0.0.1", port, 15, proc)
    return Broker("mosquitto", "127.0.0.1", None, port, ca, proc.pid, {"kind": "none"},
                  "mosquitto 2.0 TLS (persistence true: in-memory, periodic save, no fsync per msg)", proc)


# ------------------------------------------------------------------------------------------- amqtt


def ensure_amqtt(log: Any = print) -> Path:
    """The bench-only venv with amqtt (created on first use); returns its python."""
    python = AMQTT_VENV / "bin" / "python"
    probe = [str(python), "-c", "import amqtt"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log("bench: creating bench/.venv-amqtt and installing amqtt (first use only)")
    base = os.environ.get("BENCH_BASE_PYTHON", "python3")
    subprocess.run([base, "-m", "venv", str(AMQTT_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "amqtt"], check=True)
    return python


def start_amqtt(workdir: Path, cert: Path, key: Path, ca: Path) -> Broker:
    python = ensure_amqtt()
    workdir.mkdir(parents=True, exist_ok=True)
    plain, tls = free_port(), free_port()
    conf = workdir / "amqtt.yaml"
    conf.write_text(
        "listeners:\n"
        f"  default:\n    type: tcp\n    bind: 127.0.0.1:{plain}\n"
        f"  tls:\n    type: tcp\n    bind: 127.0.0.1:{tls}\n    ssl: true\n"
        f"    certfile: {cert}\n    keyfile: {key}\n    cafile: {ca}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
    )
    proc = subprocess.Popen([str(python), "-m", "amqtt.scripts.broker_script", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=(workdir / "amqtt.err").open("wb"),
                            cwd=str(workdir))
    wait_port("127.0.0.1", plain, 60, proc)
    wait_port("127.0.0.1", tls, 10, proc)
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('amqtt'))"],
                             capture_output=True, text=True).stdout.strip()
    return Broker("amqtt", "127.0.0.1", plain, tls, ca, proc.pid, {"kind": "none"},
                  f"amqtt {version} (in-memory, no persistence)", proc)
