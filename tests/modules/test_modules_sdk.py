"""Module identities with Microsoft's real SDKs: azure-iot-device 2.14 `IoTHubModuleClient` over MQTT
(TLS on 127.0.0.110:8883, WebSockets on :443; the SDK dials these fixed ports and checks the host
name, and no other test module uses this address) and azure-iot-hub 2.7 `IoTHubRegistryManager` over
HTTPS on the same :443 (module CRUD, module twins, module methods). Telemetry is read back as a back
end reads it, through the hub's consumer API; refusals are checked in the audit log."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from azure.iot.device import X509, IoTHubModuleClient, Message, MethodRequest, MethodResponse
from methods_helpers import API, HubHarness, new_key
from mqtt_helpers import ServiceConsumer

from tether.registry.models import Module
from tether.security import pki
from tether.security.sas import build_token
from tether.storage.base import AuditRecord

IP = "127.0.0.110"
SDK_OPTIONS: dict[str, Any] = {"connection_retry": False, "keep_alive": 30}

ModuleFactory = Callable[..., Module]
ClientFactory = Callable[..., IoTHubModuleClient]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubHarness]:
    """MQTT/TLS on :8883; REST, the consumer API and MQTT over WebSockets over HTTPS on :443."""
    h = HubHarness(Path(tmp_path_factory.mktemp("modules-hub")), ip=IP, mqtt_port=8883, tls=True,
                   hostname=IP, rest_tls=True, rest_port=443)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def rest(harness: HubHarness) -> Iterator[httpx.Client]:
    with harness.rest() as client:
        yield client


@pytest.fixture(scope="module")
def consumer(harness: HubHarness) -> Iterator[ServiceConsumer]:
    c = ServiceConsumer(harness)  # type: ignore[arg-type]  # the harness has what it uses
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def registry_manager(harness: HubHarness) -> Iterator[Any]:
    """azure-iot-hub's registry manager on `https://127.0.0.110` (the dev root via REQUESTS_CA_BUNDLE)."""
    from azure.iot.hub import IoTHubRegistryManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(harness.ca_file))
        yield IoTHubRegistryManager.from_connection_string(
            harness.call(harness.hub.service_connection_string("iothubowner")))


@pytest.fixture
def new_module(harness: HubHarness) -> ModuleFactory:
    """`new_module(device_id, module_id, **body)`: the module (its device created when missing)."""

    def make(device_id: str, module_id: str, **body: Any) -> Module:
        if harness.call(harness.hub.registry.find(device_id)) is None:
            harness.create_device(device_id)
        return harness.call(harness.hub.modules.create(device_id, module_id, body, actor="test"))

    return make


def connection_string(module: Module) -> str:
    key = module.authentication.symmetric_key.primary_key
    return f"HostName={IP};DeviceId={module.device_id};ModuleId={module.module_id};SharedAccessKey={key}"


@pytest.fixture
def clients(harness: HubHarness) -> Iterator[ClientFactory]:
    """`clients(module, **options)`: a connected IoTHubModuleClient, shut down after the test."""
    made: list[IoTHubModuleClient] = []

    def make(module: Module, **options: Any) -> IoTHubModuleClient:
        assert harness.ca_file is not None
        client = IoTHubModuleClient.create_from_connection_string(
            connection_string(module), server_verification_cert=harness.ca_file.read_text(),
            **{**SDK_OPTIONS, **options})
        made.append(client)
        client.connect()
        return client

    try:
        yield make
    finally:
        for client in made:
            client.shutdown()


def read_events(consumer: ServiceConsumer, device_id: str, group: str) -> list[dict[str, Any]]:
    events, _ = consumer.read(consumer.partition_of(device_id), consumer.create_group(group),
                              fromSequence="0")
    return [e for e in events if e["deviceId"] == device_id]


def module_auth_method(event: dict[str, Any]) -> dict[str, Any]:
    method: dict[str, Any] = json.loads(event["systemProperties"]["iothub-connection-auth-method"])
    return method


def test_module_client_telemetry_carries_the_module_id(harness: HubHarness, rest: httpx.Client,
                                                       consumer: ServiceConsumer, new_module: ModuleFactory,
                                                       clients: ClientFactory) -> None:
    module = new_module("tele-dev", "tele-mod")
    client = clients(module)
    for i in range(3):
        client.send_message(Message(json.dumps({"n": i}), message_id=f"mid-{i}",
                                    content_type="application/json", content_encoding="utf-8"))
    client.send_message_to_output(Message("alert"), "alerts")
    events = read_events(consumer, "tele-dev", "cg-tele")
    assert [e["systemProperties"].get("message-id") for e in events[:3]] == ["mid-0", "mid-1", "mid-2"]
    assert [json.loads(e["body"])["n"] for e in events[:3]] == [0, 1, 2]
    for event in events:
        assert event["moduleId"] == "tele-mod"
        assert event["systemProperties"]["iothub-connection-module-id"] == "tele-mod"
        assert event["systemProperties"]["iothub-connection-device-id"] == "tele-dev"
        assert module_auth_method(event) == {"scope": "module", "type": "sas", "issuer": "iothub"}
    assert len(events) == 4 and events[3]["systemProperties"]["iothub-outputname"] == "alerts"
    # The module has its own connection state; its device's stays as it was.
    got = rest.get(f"/devices/tele-dev/modules/tele-mod{API}").json()
    assert got["connectionState"] == "Connected" and got["lastActivityTime"] > "2000"
    assert rest.get(f"/devices/tele-dev{API}").json()["connectionState"] == "Disconnected"


def test_module_client_over_websockets(harness: HubHarness, consumer: ServiceConsumer,
                                       new_module: ModuleFactory, clients: ClientFactory) -> None:
    client = clients(new_module("ws-dev", "ws-mod"), websockets=True)
    client.send_message(Message("over websockets"))
    (event,) = read_events(consumer, "ws-dev", "cg-ws")
    assert event["moduleId"] == "ws-mod" and event["body"] == "over websockets"
    assert harness.hub.connections.get("ws-dev", "ws-mod") is not None
    assert harness.hub.connections.get("ws-dev", "ws-mod").protocol == "mqtt-ws"  # type: ignore[union-attr]


def test_module_client_with_a_self_signed_certificate(harness: HubHarness, tmp_path: Path,
                                                      consumer: ServiceConsumer,
                                                      new_module: ModuleFactory) -> None:
    cert, key = pki.issue_device_cert("x509-dev/x509-mod", self_signed=True)
    cert_file, key_file = tmp_path / "module.pem", tmp_path / "module.key"
    pki.write_certificates(cert_file, [cert])
    pki.write_private_key(key_file, key)
    new_module("x509-dev", "x509-mod", authentication={
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": pki.thumbprints(cert)[0]}})
    assert harness.ca_file is not None
    client = IoTHubModuleClient.create_from_x509_certificate(
        x509=X509(str(cert_file), str(key_file)), hostname=IP, device_id="x509-dev", module_id="x509-mod",
        server_verification_cert=harness.ca_file.read_text(), **SDK_OPTIONS)
    try:
        client.connect()
        client.send_message(Message("signed"))
    finally:
        client.shutdown()
    (event,) = read_events(consumer, "x509-dev", "cg-x509")
    assert event["moduleId"] == "x509-mod"
    assert module_auth_method(event) == {"scope": "module", "type": "x509Certificate", "issuer": "external"}


def test_module_twin_desired_patches_reach_the_module_client(rest: httpx.Client, new_module: ModuleFactory,
                                                             clients: ClientFactory) -> None:
    client = clients(new_module("twin-dev", "twin-mod"))
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    path = f"/twins/twin-dev/modules/twin-mod{API}"
    r = rest.patch(path, json={"properties": {"desired": {"rate": 5}}}, headers={"If-Match": '"*"'})
    assert r.status_code == 200, r.text
    assert patches.get(timeout=15) == {"rate": 5, "$version": 2}
    r = rest.patch(f"/twins/twin-dev{API}", json={"properties": {"desired": {"device-only": 1}}})
    assert r.status_code == 200, r.text  # the device's twin: nothing reaches the module
    r = rest.patch(path, json={"properties": {"desired": {"rate": None, "mode": "eco"}}})
    assert patches.get(timeout=15) == {"rate": None, "mode": "eco", "$version": 3}
    assert patches.empty()
    twin = client.get_twin()
    assert twin["desired"] == {"mode": "eco", "$version": 3} and twin["reported"] == {"$version": 1}
    client.patch_twin_reported_properties({"fw": "1.2", "nested": {"ok": True}})
    module_twin = rest.get(path).json()
    assert module_twin["moduleId"] == "twin-mod" and module_twin["deviceId"] == "twin-dev"
    assert module_twin["properties"]["reported"]["fw"] == "1.2"
    assert module_twin["properties"]["reported"]["$version"] == 2 and "capabilities" not in module_twin
    device_twin = rest.get(f"/twins/twin-dev{API}").json()
    assert "fw" not in device_twin["properties"]["reported"] and "moduleId" not in device_twin
    assert "mode" not in device_twin["properties"]["desired"]


def test_module_answers_methods_invoked_by_the_service_sdk(harness: HubHarness, registry_manager: Any,
                                                           rest: httpx.Client, new_module: ModuleFactory,
                                                           clients: ClientFactory) -> None:
    from azure.iot.hub.models import CloudToDeviceMethod

    client = clients(new_module("meth-dev", "meth-mod"))
    seen: list[MethodRequest] = []

    def handler(request: MethodRequest) -> None:
        seen.append(request)
        body = {"name": request.name, "got": request.payload}
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, body))

    client.on_method_request_received = handler
    result = registry_manager.invoke_device_module_method("meth-dev", "meth-mod", CloudToDeviceMethod(
        method_name="reboot", payload={"delay": 3}, response_timeout_in_seconds=15,
        connect_timeout_in_seconds=5))
    assert result.status == 201 and result.payload == {"name": "reboot", "got": {"delay": 3}}
    assert [r.name for r in seen] == ["reboot"]
    # The device itself is not connected: a method for the device is not the module's.
    r = rest.post(f"/twins/meth-dev/methods{API}", json={"methodName": "reboot"})
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"
    r = rest.post(f"/twins/meth-dev/modules/other/methods{API}", json={"methodName": "reboot"})
    assert r.status_code == 404 and r.json()["errorCode"] == "ModuleNotFound"
    assert harness.hub.methods.online("meth-dev", "meth-mod") is not None


def test_service_sdk_module_crud_and_module_twins(registry_manager: Any, harness: HubHarness) -> None:
    from azure.iot.hub.models import Twin, TwinProperties
    from msrest.exceptions import HttpOperationError

    rm = registry_manager
    rm.create_device_with_sas("crud-dev", new_key(), new_key(), "enabled")
    created = rm.create_module_with_sas("crud-dev", "crud-mod", None, None, None)
    keys = created.authentication.symmetric_key
    assert (created.device_id, created.module_id) == ("crud-dev", "crud-mod")
    assert created.authentication.type == "sas"
    assert keys.primary_key and keys.secondary_key and keys.primary_key != keys.secondary_key  # generated
    assert created.generation_id and created.etag and created.connection_state == "Disconnected"
    got = rm.get_module("crud-dev", "crud-mod")
    assert (got.etag, got.generation_id, got.authentication.symmetric_key.primary_key) == (
        created.etag, created.generation_id, keys.primary_key)
    with pytest.raises(HttpOperationError) as dup:
        rm.create_module_with_sas("crud-dev", "crud-mod", None, None, None)
    assert dup.value.response.status_code == 409

    k1, k2 = new_key(), new_key()
    updated = rm.update_module_with_sas("crud-dev", "crud-mod", "IotEdge", created.etag, k1, k2)
    assert updated.authentication.symmetric_key.primary_key == k1 and updated.managed_by == "IotEdge"
    assert updated.etag != created.etag and updated.generation_id == created.generation_id
    with pytest.raises(HttpOperationError) as stale:
        rm.update_module_with_sas("crud-dev", "crud-mod", None, created.etag, new_key(), new_key())
    assert stale.value.response.status_code == 412

    thumb = "AB" * 20
    rm.create_module_with_x509("crud-dev", "cert-mod", None, thumb, None)
    listed = rm.get_modules("crud-dev")
    assert [(m.module_id, m.authentication.type) for m in listed] == [
        ("cert-mod", "selfSigned"), ("crud-mod", "sas")]
    assert listed[0].authentication.x509_thumbprint.primary_thumbprint == thumb

    twin = rm.get_module_twin("crud-dev", "crud-mod")
    assert (twin.device_id, twin.module_id, twin.version) == ("crud-dev", "crud-mod", 1)
    patched = rm.update_module_twin("crud-dev", "crud-mod", Twin(
        tags={"role": "edge"}, properties=TwinProperties(desired={"rate": 7})), twin.etag)
    assert patched.tags == {"role": "edge"} and patched.properties.desired["rate"] == 7
    assert patched.properties.desired["$version"] == 2 and patched.etag != twin.etag
    with pytest.raises(HttpOperationError) as stale_twin:
        rm.update_module_twin("crud-dev", "crud-mod", Twin(tags={"role": "x"}), twin.etag)
    assert stale_twin.value.response.status_code == 412
    replaced = rm.replace_module_twin("crud-dev", "crud-mod", Twin(
        tags={"role": "gateway"}, properties=TwinProperties(desired={})))
    assert replaced.tags == {"role": "gateway"} and "rate" not in replaced.properties.desired
    assert replaced.properties.desired["$version"] == 3
    assert rm.get_twin("crud-dev").tags in (None, {})  # the device twin is its own

    rm.delete_module("crud-dev", "crud-mod")
    with pytest.raises(HttpOperationError) as gone:
        rm.get_module("crud-dev", "crud-mod")
    assert gone.value.response.status_code == 404
    assert [m.module_id for m in rm.get_modules("crud-dev")] == ["cert-mod"]
    rm.delete_device("crud-dev")  # and the device takes its modules with it
    assert harness.call(harness.hub.storage.modules.get("crud-dev", "cert-mod")) is None
    actions = {r.action for r in audit(harness) if r.target and r.target.startswith("crud-dev/")}
    assert {"module.create", "module.update", "module.delete", "twin.update", "twin.replace"} <= actions


def test_deleting_a_module_closes_its_connection(harness: HubHarness, rest: httpx.Client,
                                                  new_module: ModuleFactory, clients: ClientFactory) -> None:
    module = new_module("del-dev", "del-mod")
    clients(module)
    harness.wait(lambda: harness.hub.connections.get("del-dev", "del-mod") is not None,
                 what="module connected")
    r = rest.delete(f"/devices/del-dev/modules/del-mod{API}", headers={"If-Match": f'"{module.etag}"'})
    assert r.status_code == 204, r.text
    harness.wait(lambda: harness.hub.connections.get("del-dev", "del-mod") is None, timeout=10,
                 what="module connection closed")
    assert connack(harness, "del-dev/del-mod", module_username("del-dev", "del-mod"),
                   module_token(module)) == 4  # the deleted module cannot come back
    assert refusal(harness, "device:del-dev/del-mod", "unknown-module").action == "auth.mqtt"


# --- refusals -------------------------------------------------------------------------------------

def module_username(device_id: str, module_id: str) -> str:
    return f"{IP}/{device_id}/{module_id}/?api-version=2021-04-12"


def module_token(module: Module, *, resource: str | None = None) -> str:
    key = module.authentication.symmetric_key.primary_key
    assert key is not None
    scope = resource or f"{IP}/devices/{module.device_id}/modules/{module.module_id}"
    return build_token(scope, key, int(time.time()) + 3600)


def connack(harness: HubHarness, client_id: str, username: str, password: str) -> int | None:
    """The CONNACK code paho gets for this CONNECT over TLS (None: no CONNACK)."""
    client = mqtt.Client(client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311,
                         reconnect_on_failure=False)
    client.username_pw_set(username, password)
    client.tls_set(ca_certs=str(harness.ca_file))
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: int) -> None:
        result["rc"] = rc
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: done.set()
    client.connect(IP, 8883, keepalive=30)
    client.loop_start()
    try:
        done.wait(15)
    finally:
        client.disconnect()
        client.loop_stop()
    return result.get("rc")


def audit(harness: HubHarness) -> list[AuditRecord]:
    async def run() -> list[AuditRecord]:
        await harness.hub.audit.flush()
        return await harness.hub.audit.query(limit=1000)

    return harness.call(run())


def refusal(harness: HubHarness, principal: str, reason: str, *, topic: str | None = None) -> AuditRecord:
    deadline = time.monotonic() + 10
    while True:
        for record in audit(harness):
            if (record.outcome == "refused" and record.principal == principal and record.reason == reason
                    and (topic is None or record.details.get("topic") == topic)):
                return record
        assert time.monotonic() < deadline, f"no refusal {reason} for {principal}"
        time.sleep(0.05)


def test_a_module_cannot_use_another_modules_token(harness: HubHarness, new_module: ModuleFactory) -> None:
    mine = new_module("ref-dev", "mine")
    other = new_module("ref-dev", "other")
    code = connack(harness, "ref-dev/mine", module_username("ref-dev", "mine"), module_token(other))
    assert code == 4  # bad credential
    record = refusal(harness, "device:ref-dev/mine", "wrong-scope")
    assert record.action == "auth.mqtt" and record.details.get("tokenScope") == "module"
    # The same key signing a token for its own module's scope is what works.
    assert connack(harness, "ref-dev/mine", module_username("ref-dev", "mine"), module_token(mine)) == 0


def test_a_device_token_does_not_authenticate_a_module(harness: HubHarness,
                                                       new_module: ModuleFactory) -> None:
    new_module("dtok-dev", "mod")
    device = harness.call(harness.hub.registry.get("dtok-dev"))
    device_token = harness.device_token(device)
    code = connack(harness, "dtok-dev/mod", module_username("dtok-dev", "mod"), device_token)
    assert code == 4
    record = refusal(harness, "device:dtok-dev/mod", "wrong-scope")
    assert record.details.get("tokenScope") == "device"
    # A module token presented by the device (module id dropped) is refused too.
    module = harness.call(harness.hub.modules.get("dtok-dev", "mod"))
    assert connack(harness, "dtok-dev", f"{IP}/dtok-dev/?api-version=2021-04-12", module_token(module)) == 4
    assert refusal(harness, "device:dtok-dev", "wrong-scope").details.get("tokenScope") == "module"


def test_module_client_id_must_match_the_username(harness: HubHarness, new_module: ModuleFactory) -> None:
    module = new_module("cid-dev", "mod-a")
    new_module("cid-dev", "mod-b")
    code = connack(harness, "cid-dev/mod-a", module_username("cid-dev", "mod-b"), module_token(module))
    assert code == 2  # identifier rejected, before any credential is checked
    deadline = time.monotonic() + 10
    while not [r for r in audit(harness) if r.action == "mqtt.connect" and r.reason == "client-id-mismatch"
               and r.principal == "device:cid-dev/mod-b"]:
        assert time.monotonic() < deadline, "client-id-mismatch not audited"
        time.sleep(0.05)


def test_a_module_acts_only_as_itself(harness: HubHarness, new_module: ModuleFactory) -> None:
    """Topics naming another module (or the device itself) are refused, audited, and end the connection."""
    module = new_module("own-dev", "own")
    new_module("own-dev", "sibling")
    attempts: list[tuple[str, str, str]] = [
        ("subscribe", "devices/own-dev/modules/sibling/inputs/#", "other-module"),
        ("subscribe", "devices/own-dev/messages/devicebound/#", "forbidden-topic"),  # modules get no C2D
        ("publish", "devices/own-dev/modules/sibling/messages/events/", "other-module"),
        ("publish", "devices/own-dev/messages/events/", "other-module"),  # the device's own topic
        ("publish", "devices/other-dev/modules/own/messages/events/", "other-device"),
    ]
    for verb, topic, reason in attempts:
        client = mqtt.Client(client_id="own-dev/own", clean_session=False, protocol=mqtt.MQTTv311,
                             reconnect_on_failure=False)
        client.username_pw_set(module_username("own-dev", "own"), module_token(module))
        client.tls_set(ca_certs=str(harness.ca_file))
        connected, dropped = threading.Event(), threading.Event()
        client.on_connect = lambda *_, done=connected: done.set()
        client.on_disconnect = lambda *_, done=dropped: done.set()
        client.connect(IP, 8883, keepalive=30)
        client.loop_start()
        try:
            assert connected.wait(15)
            if verb == "subscribe":
                client.subscribe(topic, 1)
            else:
                client.publish(topic, b"x", qos=1)
            assert dropped.wait(15), f"{verb} {topic} was not refused"
        finally:
            client.disconnect()
            client.loop_stop()
        record = refusal(harness, "device:own-dev/own", reason, topic=topic)
        assert record.action == f"mqtt.{verb}"
