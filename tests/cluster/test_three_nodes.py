"""Three gateway processes (`tether run`, each with its own TOML config and node id) on one fresh
PostgreSQL database and one JetStream stream + cluster subjects named for this test:

- a device connected (paho, plain MQTT) to node A receives a C2D message sent through node B's REST;
- a direct method invoked through node C's REST reaches it and returns its payload;
- disabling the device through node B drops its connection on node A within 1 s;
- after `kill -9` of node A the device reconnects to node B, and every telemetry message it got a
  PUBACK for (from A before the kill, from B after) is readable from the stream afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_env import scaleout_backends
from e2e_kit import HOSTNAME, MqttDevice, Rest, dev_pki, new_key, wait_for

from tether.cli.cluster import NodeProcess, NodeSpec, prepare_storage, stop_all, write_node_config
from tether.config import load_settings

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, NodeProcess], Path]]:
    """Nodes a, b and c, started in parallel; stopped (or killed) whatever happens."""
    with scaleout_backends() as (backend, _):
        ca, cert, key = dev_pki(tmp_path / "pki")
        nodes: dict[str, NodeProcess] = {}
        for name in ("a", "b", "c"):
            spec = NodeSpec(f"node-{name}", tmp_path / f"node-{name}", {
                "hub": {"hostname": HOSTNAME, "data_dir": str(tmp_path / f"node-{name}")},
                "listeners": {"host": "127.0.0.1", "https_port": 0, "mqtt_port": 0, "mqtt_plain_port": 0,
                              "amqp_port": 0},
                "tls": {"cert_file": str(cert), "key_file": str(key)},
                "limits": {"device_messages_per_second": 10_000.0},
                "storage": backend.storage,
                "cluster": {**backend.cluster, "node_id": f"node-{name}"},
            })
            write_node_config(spec)
            nodes[name] = NodeProcess(spec)
        settings = load_settings(hub={"hostname": HOSTNAME, "data_dir": tmp_path / "node-a"},
                                 storage=backend.storage)
        owner = asyncio.run(prepare_storage(settings, create_database=False))  # migrations + policies, once
        for node in nodes.values():
            node.connection_string = owner  # nodes never print it
        try:
            for node in nodes.values():
                node.start()
            for node in nodes.values():
                node.wait_ready(45)
            yield nodes, ca
        finally:
            stop_all(list(nodes.values()))


def test_three_gateway_processes(cluster: tuple[dict[str, NodeProcess], Path]) -> None:
    nodes, ca = cluster
    a, b = nodes["a"], nodes["b"]
    assert {"https", "mqtts", "mqtt"} <= set(a.ports) and len({n.ports["mqtt"] for n in nodes.values()}) == 3
    rest = {name: Rest(n.ports["https"], ca, n.connection_string) for name, n in nodes.items()}
    device_id, key = "cluster-dev-1", new_key()
    device = MqttDevice(device_id, key, method_answers={"getTemp": {"celsius": 21.5}})
    try:
        rest["b"].create_device(device_id, key)
        assert device.connect(a.ports["mqtt"]) == 0
        device.subscribe_all()

        # C2D through node B → the device on node A.
        rest["b"].send_c2d(device_id, b"hello from B", **{"iothub-messageid": "c2d-1"})
        device.wait_message(lambda t, p: p == b"hello from B", timeout=10)

        # Direct method through node C → the device on node A → its payload back to C's caller.
        answer = rest["c"].invoke(device_id, "getTemp", {"unit": "C"}, connect_timeout_s=5)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"status": 200, "payload": {"celsius": 21.5}}
        assert device.method_calls == [("getTemp", {"unit": "C"})]

        # Disable through node B → node A drops the connection within a second.
        began = time.monotonic()
        rest["b"].disable(device_id)
        assert device.disconnected.wait(5), "node A kept the disabled device connected"
        assert device.disconnected_at is not None
        drop_s = device.disconnected_at - began
        assert drop_s < 1.0, f"drop took {drop_s:.3f} s"
        rest["b"]._ok(rest["b"].client.post(f"/tether/devices/{device_id}/enable", json={}))

        # Telemetry on A, kill -9 A mid-stream, reconnect to B, keep sending: no PUBACKed message lost.
        assert device.connect(a.ports["mqtt"]) == 0
        stop = threading.Event()
        counter = iter(range(1_000_000))

        def flood() -> None:
            while not stop.is_set() and not device.disconnected.is_set():
                device.publish(f"m{next(counter)}")
                time.sleep(0.002)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        wait_for(lambda: len(device.acked_bodies) >= 50, timeout=20, what="50 PUBACKs from node A")
        a.kill9()
        assert device.disconnected.wait(10), "the device did not notice node A dying"
        stop.set()
        sender.join(5)
        acked_on_a = len(device.acked_bodies)
        assert device.connect(b.ports["mqtt"]) == 0
        for _ in range(20):
            device.publish(f"m{next(counter)}")
        device.wait_acked(acked_on_a + 20)
        acked = list(device.acked_bodies)

        stored = rest["c"].event_bodies(device_id)
        lost = sorted(set(acked) - set(stored))
        assert not lost, f"{len(lost)} acknowledged messages lost: {lost[:10]}"
        assert [body for body in stored if body in set(acked)] == acked  # and in the device's order
    finally:
        device.close()
        for r in rest.values():
            r.close()
