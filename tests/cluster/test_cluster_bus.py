"""Two hub nodes in this process (each its own loop thread, NATS connection and node id) on one
PostgreSQL database and one JetStream stream: every cross-node event of the cluster bus, quickly.
The three-process version with `kill -9` is test_three_nodes.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backend_env import scaleout_backends
from e2e_kit import MqttDevice, NodeThread, Rest, dev_pki, new_key, node_settings, wait_for

from tether.cluster.node import decode_id, encode_id, identity_key


@dataclass
class Pair:
    a: NodeThread
    b: NodeThread
    rest_a: Rest
    rest_b: Rest


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with scaleout_backends() as (backend, _):
        ca = dev_pki(tmp_path / "pki")[0]
        nodes: list[NodeThread] = []
        try:
            for name in ("node-a", "node-b"):
                nodes.append(NodeThread(node_settings(tmp_path / name, tmp_path / "pki",
                                                      storage=backend.storage, cluster=backend.cluster,
                                                      node_id=name)))
            a, b = nodes
            rests = [Rest(n.ports["https"], ca, n.connection_string) for n in nodes]
            try:
                yield Pair(a, b, rests[0], rests[1])
            finally:
                for r in rests:
                    r.close()
        finally:
            for n in reversed(nodes):
                n.stop()


def located(node: NodeThread, device_id: str) -> str | None:
    assert node.hub.cluster is not None
    return node.call(node.hub.cluster.locate(device_id))


def test_names_escape_ids() -> None:
    for raw in ("plain-id_1", "a.b*c>d", "dev:$%=x'(),@!?"):
        token = encode_id(raw)
        assert decode_id(token) == raw
        assert all(c.isalnum() or c in "_-=" for c in token)
    assert identity_key("d.1", "m") == "d=2E1.m"


def test_cross_node_events(pair: Pair) -> None:
    device_id, key = "dev.x", new_key()
    pair.rest_a.create_device(device_id, key)
    device = MqttDevice(device_id, key, method_answers={"ping": {"pong": 1}})
    try:
        assert device.connect(pair.a.ports["mqtt"]) == 0
        device.subscribe_all()
        wait_for(lambda: located(pair.b, device_id) == "node-a", what="presence entry of node-a")

        # C2D sent through B reaches the device on A (B wakes A's pump over the bus).
        began = time.monotonic()
        pair.rest_b.send_c2d(device_id, b"via-b")
        device.wait_message(lambda t, p: p == b"via-b", timeout=5)
        assert time.monotonic() - began < 3  # not the pump's 30 s poll

        # A desired patch written through B is pushed by A.
        version = pair.rest_b.patch_desired(device_id, {"mode": "eco"})["properties"]["desired"]["$version"]
        _, payload = device.wait_message(lambda t, p: t.startswith("$iothub/twin/PATCH/"), timeout=5)
        assert json.loads(payload) == {"mode": "eco", "$version": version}

        # A method invoked through B is answered by the device on A; the REST answer is the usual one.
        answer = pair.rest_b.invoke(device_id, "ping", [1, 2])
        assert answer.status_code == 200 and answer.json() == {"status": 200, "payload": {"pong": 1}}

        # Session takeover: the device connects to B while A still holds it; A lets go.
        second = MqttDevice(device_id, key, method_answers={"ping": {"pong": 2}})
        try:
            assert second.connect(pair.b.ports["mqtt"]) == 0
            assert device.disconnected.wait(5), "A kept the replaced connection"
            wait_for(lambda: pair.a.hub.connections.get(device_id) is None, what="A released the device")
            wait_for(lambda: located(pair.a, device_id) == "node-b", what="presence moved to node-b")
            # The persistent session's subscriptions followed the device to B (no SUBSCRIBE sent).
            answer = pair.rest_a.invoke(device_id, "ping", None, connect_timeout_s=5)
            assert answer.status_code == 200 and answer.json()["payload"] == {"pong": 2}

            # Disabling through A drops the connection on B within a second.
            began = time.monotonic()
            pair.rest_a.disable(device_id)
            assert second.disconnected.wait(5)
            assert second.disconnected_at is not None and second.disconnected_at - began < 1.0
            wait_for(lambda: located(pair.a, device_id) is None, what="presence entry removed")
        finally:
            second.close()
    finally:
        device.close()


def test_remote_method_errors_match_single_node(pair: Pair) -> None:
    device_id, key = "silent", new_key()
    pair.rest_a.create_device(device_id, key)
    assert pair.rest_b.invoke(device_id, "x", None).json()["errorCode"] == "DeviceNotOnline"
    device = MqttDevice(device_id, key)
    try:
        assert device.connect(pair.a.ports["mqtt"]) == 0
        wait_for(lambda: located(pair.b, device_id) == "node-a", what="presence entry of node-a")
        # Connected on A but not subscribed to methods: 404 DeviceNotOnline, as on one node.
        answer = pair.rest_b.invoke(device_id, "x", None)
        assert answer.status_code == 404 and answer.json()["errorCode"] == "DeviceNotOnline"
        # Subscribed but never answering: 504 after the response timeout.
        assert device.client is not None
        device.client.subscribe("$iothub/methods/POST/#", 0)
        device.method_answers = {}
        device.client.on_message = lambda *args: None
        wait_for(lambda: pair.a.hub.methods.online(device_id) is not None, what="method subscription")
        began = time.monotonic()
        answer = pair.rest_b.invoke(device_id, "x", None, timeout_s=5)
        assert answer.status_code == 504 and answer.json()["errorCode"] == "GatewayTimeout"
        assert 4.5 < time.monotonic() - began < 9
    finally:
        device.close()


def test_duplicate_node_id_is_refused(pair: Pair) -> None:
    from tether.cluster.bus import ClusterBus
    from tether.config import ClusterSettings, ConfigError

    assert pair.a.hub.cluster is not None
    names = pair.a.hub.cluster.names
    twin = ClusterBus(ClusterSettings(nats_url=pair.a.hub.cluster.url, subject_prefix=names.prefix),
                      node_id="node-a")
    try:
        with pytest.raises(ConfigError, match="already running"):
            pair.a.call(twin.start())
    finally:
        pair.a.call(twin.close())


def test_a_write_on_one_node_reaches_the_other_nodes_caches_at_once(pair: Pair) -> None:
    """Authentication material is cached per node (2 s TTL); a write anywhere is announced, so a
    regenerated device key or policy key takes effect on every node immediately."""
    device_id, key = "dev.rotate", new_key()
    pair.rest_a.create_device(device_id, key)
    first = MqttDevice(device_id, key)
    try:
        assert first.connect(pair.a.ports["mqtt"]) == 0  # node A now caches the device
    finally:
        first.close()
    rotated = pair.rest_b._ok(pair.rest_b.client.post(
        f"/tether/devices/{device_id}/regenerate-key?key=primary&api-version=2021-04-12"))
    new_primary = rotated["authentication"]["symmetricKey"]["primaryKey"]
    assert new_primary != key
    time.sleep(0.3)  # the announcement crosses NATS; far below the cache TTL
    old = MqttDevice(device_id, key)
    fresh = MqttDevice(device_id, new_primary)
    try:
        assert old.connect(pair.a.ports["mqtt"]) == 4, "node A still honours the replaced key"
        assert fresh.connect(pair.a.ports["mqtt"]) == 0, "node A refuses the new key"
    finally:
        old.close()
        fresh.close()

    # Policies likewise: regenerating the owner key on B invalidates A's cached policies at once.
    assert pair.a.hub.cluster is not None
    before = pair.a.hub.cluster.stats["received"]
    pair.rest_b._ok(pair.rest_b.client.post("/tether/policies/registryRead/regenerate-key?key=primary"))
    wait_for(lambda: pair.a.hub.cluster.stats["received"] > before, what="policy change announced to A")
    assert pair.a.hub.policies._cached is None  # next lookup reads the database


def test_modules_across_nodes(pair: Pair) -> None:
    """A module connected to A: its desired patches, methods and deletion go through B."""
    device_id, device_key, module_key = "dev.mod", new_key(), new_key()
    pair.rest_a.create_device(device_id, device_key)
    auth = {"type": "sas", "symmetricKey": {"primaryKey": module_key}}
    pair.rest_b._ok(pair.rest_b.client.put(f"/devices/{device_id}/modules/edge.1?api-version=2021-04-12",
                                           json={"moduleId": "edge.1", "authentication": auth}))
    module = MqttDevice(device_id, module_key, module_id="edge.1",
                        method_answers={"ping": {"from": "module"}})
    try:
        assert module.connect(pair.a.ports["mqtt"]) == 0
        module.subscribe_all()
        assert pair.b.hub.cluster is not None
        wait_for(lambda: pair.b.call(pair.b.hub.cluster.locate(device_id, "edge.1")) == "node-a",
                 what="module presence on node-a")
        assert located(pair.b, device_id) is None  # the device itself is not connected

        r = pair.rest_b.client.patch(f"/twins/{device_id}/modules/edge.1?api-version=2021-04-12",
                                     json={"properties": {"desired": {"mode": "eco"}}})
        assert r.status_code == 200, r.text
        _, payload = module.wait_message(lambda t, p: t.startswith("$iothub/twin/PATCH/"), timeout=5)
        assert json.loads(payload) == {"mode": "eco", "$version": 2}

        answer = pair.rest_b.client.post(f"/twins/{device_id}/modules/edge.1/methods?api-version=2021-04-12",
                                         json={"methodName": "ping", "responseTimeoutInSeconds": 10})
        assert answer.status_code == 200 and answer.json() == {"status": 200, "payload": {"from": "module"}}

        began = time.monotonic()
        r = pair.rest_b.client.delete(f"/devices/{device_id}/modules/edge.1?api-version=2021-04-12")
        assert r.status_code == 204, r.text
        assert module.disconnected.wait(5), "node A kept the deleted module's connection"
        assert time.monotonic() - began < 3
        assert module.connect(pair.a.ports["mqtt"]) == 4  # and A's cache no longer knows it
    finally:
        module.close()
