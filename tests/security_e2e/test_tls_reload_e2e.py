"""Hot reload of the server certificate through the real hub — by the admin call and by SIGHUP to a
running `tether run` — swaps what NEW connections get while live HTTPS keep-alive and MQTT/TLS
connections carry on with the certificate they started with."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from cryptography import x509
from e2e_helpers import (
    API,
    HttpsConn,
    client_ctx,
    device_token,
    hub_settings,
    mqtt_ping,
    mqtt_sas_connect,
    new_key,
    policy_token,
    refusals,
    sas_device,
)

from tether.hub import Hub
from tether.protocols.mqtt.server import stop_mqtt
from tether.security import pki
from tether.security.sas import build_token
from tether.security.trust import sha256_hex
from tether.server import start_listeners

TETHER = Path(sys.executable).with_name("tether")


def renew_server_certificate(pki_dir: Path) -> x509.Certificate:
    """A new server certificate (new key) under the same root, as a renewal job would write it."""
    root = pki.load_certificate(pki_dir / "root-ca.pem")
    root_key = pki.load_private_key(pki_dir / "root-ca.key")
    cert, key = pki.issue_server_cert(["localhost"], ["127.0.0.1"], root, root_key, days=90)
    pki.write_private_key(pki_dir / "server.key", key)  # key first: a reload in between fails safely
    pki.write_certificates(pki_dir / "server.pem", [cert])
    return cert


async def served_certificate(port: int, roots: list[x509.Certificate]) -> x509.Certificate:
    conn = await HttpsConn.open(port, client_ctx(roots))
    try:
        return conn.peer_certificate()
    finally:
        await conn.close()


async def test_start_listeners_binds_ephemeral_ports_and_records_them(data_dir: Path) -> None:
    settings = hub_settings(data_dir)
    pki.init_pki(settings.pki_dir, ["localhost"], ["127.0.0.1"])
    root = pki.load_certificate(settings.pki_dir / "root-ca.pem")
    hub = Hub(settings)
    await hub.open()
    try:
        await start_listeners(hub)  # the real one, exactly as `tether run` calls it
        assert {"https", "mqtts"} <= set(hub.ports) and all(p > 0 for p in hub.ports.values())
        assert hub.ports["https"] != hub.ports["mqtts"]
        conn = await HttpsConn.open(hub.ports["https"], client_ctx([root]))
        assert (await conn.get("/healthz")).status == 200
        await conn.close()
        device = await sas_device(hub, "ports-dev")
        _, writer = await mqtt_sas_connect(hub.ports["mqtts"], client_ctx([root]), "ports-dev",
                                           device_token(device))
        writer.close()
    finally:
        await stop_mqtt(hub)
        await hub.close()


async def test_admin_reload_swaps_the_certificate_for_new_connections_only(hub: Hub) -> None:
    pki_dir = hub.settings.pki_dir
    roots = [pki.load_certificate(pki_dir / "root-ca.pem")]
    old = await served_certificate(hub.ports["https"], roots)
    owner = await policy_token(hub, "iothubowner")
    device = await sas_device(hub, "reload-dev")
    keepalive = await HttpsConn.open(hub.ports["https"], client_ctx(roots))
    assert (await keepalive.get("/healthz")).status == 200
    mqtt_reader, mqtt_writer = await mqtt_sas_connect(hub.ports["mqtts"], client_ctx(roots), "reload-dev",
                                                      device_token(device))

    new = renew_server_certificate(pki_dir)
    reply = await keepalive.post("/tether/admin/tls/reload", owner)  # on the old connection itself
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["thumbprint"] == sha256_hex(new) != sha256_hex(old)
    assert body["notAfter"].startswith(new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S"))
    assert body["generation"] == 2

    assert await served_certificate(hub.ports["https"], roots) == new  # new HTTPS connections
    mqtt_conn = await HttpsConn.open(hub.ports["mqtts"], client_ctx(roots))  # a TLS handshake is enough
    assert mqtt_conn.peer_certificate() == new
    await mqtt_conn.close()
    # Live connections keep working on the certificate they were opened with.
    assert keepalive.peer_certificate() == old
    assert (await keepalive.get("/healthz")).status == 200
    await mqtt_ping(mqtt_reader, mqtt_writer)
    await keepalive.close()
    mqtt_writer.close()
    record = (await hub.audit.query(action_prefix="tls.reload"))[0]
    assert (record.outcome, record.principal) == ("ok", "policy:iothubowner")
    assert record.details["thumbprint"] == sha256_hex(new)


async def test_a_failed_reload_keeps_serving_the_previous_certificate(hub: Hub) -> None:
    pki_dir = hub.settings.pki_dir
    roots = [pki.load_certificate(pki_dir / "root-ca.pem")]
    old = await served_certificate(hub.ports["https"], roots)
    _, stray_key = pki.issue_root_ca("unrelated")
    pki.write_private_key(pki_dir / "server.key", stray_key)  # does not match server.pem
    conn = await HttpsConn.open(hub.ports["https"], client_ctx(roots))
    reply = await conn.post("/tether/admin/tls/reload", await policy_token(hub, "iothubowner"))
    assert (reply.status, reply.json()["errorCode"]) == (500, "TlsReloadFailed")
    assert (await conn.get("/healthz")).status == 200
    await conn.close()
    assert await served_certificate(hub.ports["https"], roots) == old
    record = (await hub.audit.query(action_prefix="tls.reload"))[0]
    assert record.outcome == "failed" and record.reason
    assert not await refusals(hub, "missing-permission")


@asynccontextmanager
async def tether_process(
    data_dir: Path, log: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, int], str]]:
    """`tether init` then `tether run` on 127.0.0.1 ephemeral ports; yields (process, ports, owner
    key from the connection string `init` prints)."""
    env = {**os.environ, "TETHER_HUB__HOSTNAME": "localhost", "TETHER_LISTENERS__HOST": "127.0.0.1",
           "TETHER_LISTENERS__HTTPS_PORT": "0", "TETHER_LISTENERS__MQTT_PORT": "0"}
    env.pop("TETHER_CONFIG", None)
    init = await asyncio.to_thread(subprocess.run, [str(TETHER), "--data-dir", str(data_dir), "init"],
                                   env=env, capture_output=True, timeout=120)
    assert init.returncode == 0, init.stderr
    owner_key = init.stdout.decode().strip().split("SharedAccessKey=", 1)[1]
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            str(TETHER), "--data-dir", str(data_dir), "run", env=env, stdout=asyncio.subprocess.PIPE,
            stderr=err)
    ports: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, f"tether run exited: {log.read_text()}"
            if match := re.search(r"(\w+)\s+listening on [\d.]+:(\d+)", line):
                ports[match[1]] = int(match[2])
            if line.startswith("Tether hub ready"):
                break
        yield proc, ports, owner_key
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_sighup_reloads_the_certificate_of_a_running_hub(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with tether_process(data_dir, tmp_path / "tether.log") as (proc, ports, owner_key):
        pki_dir = data_dir / "pki"
        roots = [pki.load_certificate(pki_dir / "root-ca.pem")]
        keepalive = await HttpsConn.open(ports["https"], client_ctx(roots))
        old = keepalive.peer_certificate()
        # A device, created over the REST API with the owner policy, connects over MQTT/TLS.
        auth = build_token("localhost", owner_key, int(time.time()) + 600, "iothubowner")
        key = new_key()
        body = (b'{"deviceId":"hup-dev","authentication":{"type":"sas","symmetricKey":{"primaryKey":"%s",'
                b'"secondaryKey":"%s"}}}' % (key.encode(), new_key().encode()))
        reply = await keepalive.request("PUT", f"/devices/hup-dev{API}",
                                        {"Authorization": auth, "Content-Type": "application/json"}, body)
        assert reply.status == 200, reply.body
        token = build_token("localhost/devices/hup-dev", key, int(time.time()) + 600)
        mqtt_reader, mqtt_writer = await mqtt_sas_connect(ports["mqtts"], client_ctx(roots), "hup-dev", token)

        new = renew_server_certificate(pki_dir)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while await served_certificate(ports["https"], roots) != new:
            assert time.monotonic() < deadline, "SIGHUP did not reload the certificate"
            await asyncio.sleep(0.1)
        mqtt_conn = await HttpsConn.open(ports["mqtts"], client_ctx(roots))
        assert mqtt_conn.peer_certificate() == new
        await mqtt_conn.close()

        assert keepalive.peer_certificate() == old
        assert (await keepalive.get("/healthz")).status == 200
        await mqtt_ping(mqtt_reader, mqtt_writer)
        await keepalive.close()
        mqtt_writer.close()
        assert proc.returncode is None  # SIGHUP reloaded; it did not stop the hub
