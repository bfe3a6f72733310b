"""A hub with every listener on its own loopback address (AMQPS 5671, HTTPS 443 for AmqpWs, MQTT 8883)
on a private loop in a daemon thread, and Microsoft's Node.js device SDK as a child process driven over
JSON lines (`tests/node/device.js`)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tether.config import load_settings
from tether.hub import Hub
from tether.registry.models import Device
from tether.security import pki
from tether.security.sas import build_token

T = TypeVar("T")
API = "?api-version=2021-04-12"
NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def ensure_node_modules() -> None:
    """`npm ci` into tests/node/node_modules (git-ignored) from the committed lock file, once."""
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed for the Node.js SDK tests (Node 20 + npm)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600,
                   capture_output=True)


class AmqpHub:
    """A started hub (`server.start_listeners`) whose host name is its loopback IP."""

    def __init__(self, data_dir: Path, ip: str, *, https_port: int = 443, **limits: Any) -> None:
        self.ip = ip
        files = pki.init_pki(data_dir / "pki", ["localhost"], [ip])
        root, root_key = pki.load_certificate(files.root_cert), pki.load_private_key(files.root_key)
        cert, key = pki.server_cert_for_ip(ip, root, root_key)
        cert_file, key_file = data_dir / "server.pem", data_dir / "server.key"
        pki.write_certificates(cert_file, [cert])
        pki.write_private_key(key_file, key)
        self.ca_file: Path = files.root_cert
        self.data_dir = data_dir
        self.settings = load_settings(
            hub={"hostname": ip, "data_dir": data_dir},
            listeners={"host": ip, "mqtt_port": 8883, "https_port": https_port, "amqp_port": 5671},
            tls={"cert_file": cert_file, "key_file": key_file},
            limits={"device_messages_per_second": 1000.0, **limits},
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="amqp-hub", daemon=True)
        self._thread.start()
        self.hub: Hub = self.call(self._open())

    async def _open(self) -> Hub:
        from tether.server import start_listeners

        hub = Hub(self.settings)
        await hub.open()
        await start_listeners(hub)
        return hub

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.hub.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    # --- identities ---------------------------------------------------------------------------------
    def create_device(self, device_id: str) -> Device:
        body = {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key(),
                                                                     "secondaryKey": new_key()}}}
        return self.call(self.hub.registry.create(device_id, body, actor="test"))

    def create_x509_device(self, device_id: str) -> tuple[Device, Path, Path]:
        cert, key = pki.issue_device_cert(device_id, self_signed=True)
        body = {"authentication": {"type": "selfSigned",
                                   "x509Thumbprint": {"primaryThumbprint": pki.thumbprints(cert)[0]}}}
        device = self.call(self.hub.registry.create(device_id, body, actor="test"))
        return device, *write_identity(self.data_dir, device_id, cert, key)

    def device_token(self, device: Device, ttl: float = 3600, *, resource: str | None = None) -> str:
        key = device.authentication.symmetric_key.primary_key
        assert key is not None
        return build_token(resource or f"{self.ip}/devices/{device.device_id}", key, int(time.time() + ttl))

    def connection_string(self, device: Device) -> str:
        if device.authentication.symmetric_key.primary_key is None:
            return f"HostName={self.ip};DeviceId={device.device_id};x509=true"
        key = device.authentication.symmetric_key.primary_key
        return f"HostName={self.ip};DeviceId={device.device_id};SharedAccessKey={key}"

    def policy_token(self, policy: str = "iothubowner", ttl: int = 3600) -> str:
        record = self.call(self.hub.policies.get(policy))
        return build_token(self.ip, record.primary_key, int(time.time()) + ttl, policy)

    def service_connection_string(self, policy: str = "iothubowner") -> str:
        record = self.call(self.hub.policies.get(policy))
        return f"HostName={self.ip};SharedAccessKeyName={policy};SharedAccessKey={record.primary_key}"

    def rest(self, policy: str = "iothubowner") -> httpx.Client:
        port = self.hub.ports["https"]
        return httpx.Client(base_url=f"https://{self.ip}:{port}", verify=str(self.ca_file), timeout=60,
                            headers={"Authorization": self.policy_token(policy)})

    # --- what happened ------------------------------------------------------------------------------
    def events_of(self, device_id: str, *, timeout: float = 30, count: int = 1) -> list[dict[str, Any]]:
        """Telemetry of one device read back through the consumer API (REST long-poll)."""
        partition = self.hub.stream.partition_for(device_id)
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        with self.rest() as client:
            next_seq = 0
            while len([e for e in seen if e["deviceId"] == device_id]) < count:
                assert time.monotonic() < deadline, f"timed out waiting for {count} events of {device_id}"
                r = client.get(f"/tether/events/partitions/{partition}/messages",
                               params={"fromSequence": next_seq, "maxCount": 100, "timeout": 2})
                assert r.status_code == 200, r.text
                seen += r.json()
                next_seq = int(r.headers.get("x-tether-next-sequence", next_seq))
        return [e for e in seen if e["deviceId"] == device_id]

    def audit_rows(self, action: str, reason: str | None = None) -> list[Any]:
        async def rows() -> list[Any]:
            found = await self.hub.audit.query(action_prefix=action, limit=1000)
            return [r for r in found if r.action == action and (reason is None or r.reason == reason)]

        return self.call(rows())

    def wait(self, predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)


def write_identity(directory: Path, name: str, cert: x509.Certificate,
                   key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pki.write_certificates(cert_path, [cert])
    pki.write_private_key(key_path, key)
    return cert_path, key_path


class NodeDevice:
    """`tests/node/device.js` as a child process: `call(op, **args)` sends a command and waits for its
    `done` (or raises on its `error`); every other event lands in `events`."""

    def __init__(self, hub: AmqpHub, device: Device, transport: str = "Amqp", *,
                 identity: tuple[Path, Path] | None = None, connection_string: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_")}
        env.update(DEVICE_CS=connection_string or hub.connection_string(device), TRANSPORT=transport,
                   CA_FILE=str(hub.ca_file), NODE_EXTRA_CA_CERTS=str(hub.ca_file))
        if identity is not None:
            env.update(CERT_FILE=str(identity[0]), KEY_FILE=str(identity[1]))
        node = shutil.which("node")
        assert node is not None
        self.proc = subprocess.Popen([node, str(NODE_DIR / "device.js")], cwd=NODE_DIR, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._ids = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.seen.append(event)
            if event.get("ev") == "done" or (event.get("ev") == "error" and event.get("op") != "client"):
                self._answers.put(event)
            else:
                self.events.put(event)

    def call(self, op: str, timeout: float = 60, **args: Any) -> Any:
        self._ids += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "id": self._ids, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"node device: no answer to {op} within {timeout} s; "
                                 f"seen {self.seen}") from None
        if answer["ev"] == "error":
            raise NodeError(answer)
        return answer.get("result")

    def next_event(self, kind: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"node device: no {kind!r} event within {timeout} s; seen {self.seen}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event.get("ev") == kind:
                return event

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


class NodeError(Exception):
    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(f"{answer.get('op')}: {answer.get('name')}: {answer.get('message')}")
        self.answer = answer
        self.name = answer.get("name")


def proton_client(hub: AmqpHub, *, user: str | None = None, password: str | None = None,
                  mechs: str = "PLAIN", timeout: float = 30) -> Any:
    """python-qpid-proton's BlockingConnection to the hub's AMQPS port (the CA trusted, SASL `mechs`)."""
    import proton
    from proton.utils import BlockingConnection

    domain = proton.SSLDomain(proton.SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(str(hub.ca_file))
    domain.set_peer_authentication(proton.SSLDomain.VERIFY_PEER)  # proton matches no IP SANs
    return BlockingConnection(f"amqps://{hub.ip}:5671", ssl_domain=domain, sasl_enabled=True,
                              allowed_mechs=mechs, user=user, password=password, timeout=timeout,
                              allow_insecure_mechs=False)


def service_user(hub: AmqpHub, policy: str = "iothubowner") -> tuple[str, str]:
    """SASL PLAIN user name and password of a shared access policy."""
    return f"{policy}@sas.root.{hub.ip}", hub.policy_token(policy)


def run_service_sdk(hub: AmqpHub, device_id: str, bodies: list[str], properties: dict[str, str] | None = None,
                    *, policy: str = "iothubowner", websocket: bool = False) -> dict[str, Any]:
    """azure-iot-hub's `IoTHubRegistryManager.send_c2d_message` (uamqp) in a child process."""
    env = dict(os.environ, SSL_CERT_FILE=str(hub.ca_file))
    script = Path(__file__).resolve().parent / "service_sdk.py"
    args = {"cs": hub.service_connection_string(policy), "device": device_id, "bodies": bodies,
            "properties": properties or {}, "websocket": websocket}
    import sys

    done = subprocess.run([sys.executable, str(script), json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"service SDK printed nothing: {done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def put_token(conn: Any, token: str, audience: str, *, request_id: Any = 1,
              token_type: str = "servicebus.windows.net:sastoken") -> tuple[int, Any, str]:
    """CBS put-token over a proton BlockingConnection: (status-code, correlation-id, description)."""
    import proton

    sender = conn.create_sender("$cbs")
    receiver = conn.create_receiver("$cbs")
    try:
        sender.send(proton.Message(body=token, id=request_id, reply_to="cbs", address="$cbs", properties={
            "operation": "put-token", "type": token_type, "name": audience}))
        reply = receiver.receive(timeout=30)  # sent pre-settled: nothing to accept
        props = reply.properties or {}
        return props["status-code"], reply.correlation_id, props.get("status-description", "")
    finally:
        sender.close()
        receiver.close()
