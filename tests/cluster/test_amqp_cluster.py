"""AMQP on every node: a device connected over AMQP to node A receives a C2D message that a service
sent over AMQP through node B, and answers a direct method invoked through node B's REST API (the
three-gateway cluster of `test_three_nodes`: its own PostgreSQL database, JetStream stream and
cluster subjects)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import proton
import pytest
from e2e_kit import HOSTNAME, Rest, new_key
from proton.utils import BlockingConnection
from test_three_nodes import cluster  # noqa: F401  (the fixture)

from tether.cli.cluster import NodeProcess
from tether.security.connstr import ServiceConnectionString, parse_connection_string
from tether.security.sas import build_token

pytestmark = pytest.mark.timeout(120)


def amqp(node: NodeProcess, ca: Path, user: str, password: str) -> BlockingConnection:
    domain = proton.SSLDomain(proton.SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(str(ca))
    domain.set_peer_authentication(proton.SSLDomain.VERIFY_PEER)
    return BlockingConnection(f"amqps://127.0.0.1:{node.ports['amqps']}", ssl_domain=domain,
                              sasl_enabled=True, allowed_mechs="PLAIN", user=user, password=password,
                              timeout=30)


def test_c2d_over_amqp_on_b_and_a_method_through_b_reach_an_amqp_device_on_a(
        cluster: tuple[dict[str, NodeProcess], Path]) -> None:  # noqa: F811
    nodes, ca = cluster
    a, b = nodes["a"], nodes["b"]
    assert "amqps" in a.ports and "amqps" in b.ports
    rest_b = Rest(b.ports["https"], ca, b.connection_string)
    device_id, key = "amqp-cluster-1", new_key()
    rest_b.create_device(device_id, key)
    token = build_token(f"{HOSTNAME}/devices/{device_id}", key, int(time.time()) + 3600)
    device = amqp(a, ca, f"{device_id}@sas.{HOSTNAME}", token)
    try:
        c2d = device.create_receiver(f"/devices/{device_id}/messages/devicebound", credit=10)
        requests = device.create_receiver(f"/devices/{device_id}/methods/devicebound", credit=10)
        answers = device.create_sender(f"/devices/{device_id}/methods/devicebound")

        # C2D over AMQP through node B → the device on node A.
        cs = parse_connection_string(b.connection_string)
        assert isinstance(cs, ServiceConnectionString)
        policy_token = build_token(HOSTNAME, cs.shared_access_key, int(time.time()) + 3600,
                                   cs.shared_access_key_name)
        service = amqp(b, ca, f"{cs.shared_access_key_name}@sas.root.{HOSTNAME}", policy_token)
        try:
            sender = service.create_sender("/messages/devicebound")
            sent = sender.send(proton.Message(body=b"hello from B", id="c2d-b-1", address=
                                              f"/devices/{device_id}/messages/devicebound"))
            assert sent.remote_state == proton.Delivery.ACCEPTED
        finally:
            service.close()
        message = c2d.receive(timeout=30)
        assert message.id == "c2d-b-1" and bytes(message.body) == b"hello from B"
        c2d.accept()

        # A direct method through node B's REST → the device on node A answers over AMQP.
        result: dict[str, Any] = {}

        def invoke() -> None:
            result["response"] = rest_b.invoke(device_id, "getTemp", {"unit": "C"}, timeout_s=30,
                                               connect_timeout_s=10)

        caller = threading.Thread(target=invoke, daemon=True)
        caller.start()
        request = requests.receive(timeout=30)
        assert request.properties["IoThub-methodname"] == "getTemp"
        assert json.loads(bytes(request.body)) == {"unit": "C"}
        answers.send(proton.Message(body=json.dumps({"celsius": 21.5}).encode(),
                                    correlation_id=request.correlation_id, properties={"IoThub-status": 200}))
        caller.join(60)
        response: httpx.Response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json() == {"status": 200, "payload": {"celsius": 21.5}}
    finally:
        device.close()
        rest_b.close()
