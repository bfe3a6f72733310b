"""Every public method of the Python SDKs against the hub at `127.0.0.80` — HostName without a port, so
the service SDK dials 443 and the device SDK 8883 (and 443 with websockets=True), exactly as against
Azure. Supported methods work; not-yet ones fail cleanly with Azure's error (501 NotImplemented, which
msrest does not retry), never by hanging or crashing the hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message, MethodResponse
from azure.iot.device import exceptions as device_errors
from azure.iot.hub import (
    DigitalTwinClient,
    IoTHubConfigurationManager,
    IoTHubHttpRuntimeManager,
    IoTHubJobManager,
    IoTHubRegistryManager,
)
from azure.iot.hub.models import (
    CloudToDeviceMethod,
    ExportImportDevice,
    QuerySpecification,
    Twin,
    TwinProperties,
)
from azure.storage.blob import BlobClient
from catalogue import OPERATIONS, SDK_CLASSES
from conformance_kit import API, AzureHub, Service, new_key, wait_for
from fleet_sdk_calls import FLEET_CALLS
from msrest.exceptions import HttpOperationError
from sdk_table import status_of
from storage_kit import take_notification

from tether.security.sas import build_token

SERVICE_SDK = Path(__file__).resolve().parents[1] / "amqp" / "service_sdk.py"  # uamqp in a child process

CLASSES: dict[str, type] = {
    "IoTHubRegistryManager": IoTHubRegistryManager,
    "IoTHubJobManager": IoTHubJobManager,
    "IoTHubConfigurationManager": IoTHubConfigurationManager,
    "IoTHubHttpRuntimeManager": IoTHubHttpRuntimeManager,
    "DigitalTwinClient": DigitalTwinClient,
    "IoTHubDeviceClient": IoTHubDeviceClient,
    "IoTHubModuleClient": IoTHubModuleClient,
}
STATUS = {method: status_of(op) for op in OPERATIONS for method in op.sdk}


def public_methods(cls: type) -> set[str]:
    return {f"{cls.__name__}.{name}" for name in dir(cls) if not name.startswith("_")}


def test_every_public_sdk_method_is_catalogued() -> None:
    assert set(CLASSES) == set(SDK_CLASSES)
    public = set().union(*(public_methods(cls) for cls in CLASSES.values()))
    listed = [m for op in OPERATIONS for m in op.sdk]
    assert len(listed) == len(set(listed)), "an SDK method is listed under two operations"
    assert public - set(listed) == set(), "public SDK methods missing from the catalogue"
    assert set(listed) - public == set(), "catalogued methods the SDKs do not have"


# --- the service SDK ---------------------------------------------------------------------------------
def _twin_patch() -> Twin:
    return Twin(tags={"site": "north"}, properties=TwinProperties(desired={"rate": 2}))


def _bulk(s: Service) -> None:
    device_id = s.device()
    current = s.registry.get_device(device_id)
    entry = ExportImportDevice(
        id=device_id,
        import_mode="updateIfMatchETag",
        e_tag=current.etag,
        status="disabled",
        authentication=current.authentication,
    )
    result = s.registry.bulk_create_or_update_devices([entry])
    assert result.is_successful, result.errors
    assert s.registry.get_device(device_id).status == "disabled"


def _query(s: Service) -> None:
    tag = uuid.uuid4().hex[:8]
    for _ in range(2):
        s.registry.update_twin(s.device(), Twin(tags={"q": tag}), "*")
    spec = QuerySpecification(query=f"SELECT * FROM devices WHERE tags.q = '{tag}'")
    first = s.registry.query_iot_hub(spec, None, 1)
    assert len(first.items) == 1 and first.continuation_token
    last = s.registry.query_iot_hub(spec, first.continuation_token, 1)
    assert len(last.items) == 1 and last.continuation_token is None  # the SDK loops while it is set


def _get_or_create(s: Service) -> None:
    """The everyday pattern: get, create if not found — needs a 404 the SDK can tell apart."""
    device_id = f"lazy-{uuid.uuid4().hex[:8]}"
    with pytest.raises(HttpOperationError) as missing:
        s.registry.get_device(device_id)
    assert missing.value.response.status_code == 404
    assert missing.value.response.headers["iothub-errorcode"] == "DeviceNotFound"
    assert missing.value.response.json()["Message"].startswith("ErrorCode:DeviceNotFound;")
    s.registry.create_device_with_sas(device_id, new_key(), new_key(), "enabled")
    assert s.registry.get_device(device_id).device_id == device_id


def _update_x509(s: Service) -> None:
    device_id = f"x-{uuid.uuid4().hex[:8]}"
    created = s.registry.create_device_with_x509(device_id, "A" * 40, "B" * 40, "enabled")
    updated = s.registry.update_device_with_x509(device_id, created.etag, "C" * 40, "D" * 40, "disabled")
    assert updated.authentication.x509_thumbprint.primary_thumbprint == "C" * 40


def _update_ca(s: Service) -> None:
    device_id = f"ca-{uuid.uuid4().hex[:8]}"
    created = s.registry.create_device_with_certificate_authority(device_id, "enabled")
    assert (
        s.registry.update_device_with_certificate_authority(device_id, created.etag, "disabled").status
        == "disabled"
    )


def _update_sas(s: Service) -> None:
    device_id = s.device()
    etag = s.registry.get_device(device_id).etag
    key = new_key()
    assert (
        s.registry.update_device_with_sas(
            device_id, etag, key, new_key(), "enabled"
        ).authentication.symmetric_key.primary_key
        == key
    )


def _delete(s: Service) -> None:
    device_id = s.device()
    s.registry.delete_device(device_id)  # the SDK sends If-Match: "*"
    device_id = s.device()
    s.registry.delete_device(device_id, s.registry.get_device(device_id).etag)
    with pytest.raises(HttpOperationError) as gone:
        s.registry.get_device(device_id)
    assert gone.value.response.status_code == 404


def _feedback(s: Service) -> None:
    s.runtime.receive_feedback_notification()  # nothing pending: 204, no error
    for call in (s.runtime.complete_feedback_notification, s.runtime.abandon_feedback_notification):
        with pytest.raises(HttpOperationError) as lost:
            call(str(uuid.uuid4()))
        assert lost.value.response.status_code == 412


def _by_connection_string(cls: type) -> Callable[[Service], Any]:
    def call(s: Service) -> None:
        client = cls.from_connection_string(s.hub.owner_cs)  # type: ignore[attr-defined]
        if isinstance(client, IoTHubRegistryManager):
            assert client.get_device_registry_statistics().total_device_count >= 0
        elif isinstance(client, IoTHubHttpRuntimeManager):
            client.receive_feedback_notification()
        elif isinstance(client, IoTHubJobManager):
            assert isinstance(client.get_import_export_jobs(), list)
        elif isinstance(client, IoTHubConfigurationManager):
            assert isinstance(client.get_configurations(), list)
        else:  # digital twins are "not yet": a 501 proves the SAS was accepted
            with pytest.raises(HttpOperationError) as refused:
                client.get_digital_twin("d1")
            assert refused.value.response.status_code == 501

    return call


class _AadCredential:
    """An Azure AD credential (azure-core's TokenCredential protocol) with a made-up token."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken("eyJ0eXAiOiJKV1QifQ.e30.c2ln", int(time.time()) + 3600)


def _by_token_credential(cls: type) -> Callable[[Service], Any]:
    def call(s: Service) -> Any:
        client = cls.from_token_credential(s.hub.ip, _AadCredential())  # type: ignore[attr-defined]
        if isinstance(client, IoTHubHttpRuntimeManager):
            return client.receive_feedback_notification()
        if isinstance(client, IoTHubRegistryManager):
            return client.get_device_registry_statistics()
        return {
            IoTHubJobManager: lambda c: c.get_import_export_jobs(),
            IoTHubConfigurationManager: lambda c: c.get_configurations(),
            DigitalTwinClient: lambda c: c.get_digital_twin("d1"),
        }[cls](client)

    return call


SERVICE_CLASSES = (
    IoTHubRegistryManager,
    IoTHubJobManager,
    IoTHubConfigurationManager,
    IoTHubHttpRuntimeManager,
    DigitalTwinClient,
)


def _modules(s: Service) -> None:
    """Module identities and module twins through the registry manager, as the SDK calls them."""
    registry = s.registry
    device_id = s.device()
    sas = registry.create_module_with_sas(device_id, "sas", None, new_key(), new_key())
    x509 = registry.create_module_with_x509(device_id, "x509", None, "A" * 40, "B" * 40)
    ca = registry.create_module_with_certificate_authority(device_id, "ca", None)
    assert (sas.module_id, x509.authentication.type, ca.authentication.type) == (
        "sas",
        "selfSigned",
        "certificateAuthority",
    )
    key = new_key()
    assert (
        registry.update_module_with_sas(
            device_id, "sas", "me", sas.etag, key, new_key()
        ).authentication.symmetric_key.primary_key
        == key
    )
    assert (
        registry.update_module_with_x509(
            device_id, "x509", "me", "*", "C" * 40, "D" * 40
        ).authentication.x509_thumbprint.primary_thumbprint
        == "C" * 40
    )
    assert registry.update_module_with_certificate_authority(device_id, "ca", "me", "*").managed_by == "me"
    assert registry.get_module(device_id, "sas").managed_by == "me"
    assert sorted(m.module_id for m in registry.get_modules(device_id)) == ["ca", "sas", "x509"]
    assert registry.get_module_twin(device_id, "sas").module_id == "sas"
    assert registry.replace_module_twin(device_id, "sas", _twin_patch()).tags == {"site": "north"}
    assert registry.update_module_twin(device_id, "sas", _twin_patch(), "*").properties.desired["rate"] == 2
    registry.delete_module(device_id, "ca")
    with pytest.raises(HttpOperationError) as gone:
        registry.get_module(device_id, "ca")
    assert gone.value.response.headers["iothub-errorcode"] == "ModuleNotFound"


SUPPORTED: dict[str, Callable[[Service], Any]] = {
    **{
        f"IoTHubRegistryManager.{name}": _modules
        for name in (
            "create_module_with_sas",
            "create_module_with_x509",
            "create_module_with_certificate_authority",
            "update_module_with_sas",
            "update_module_with_x509",
            "update_module_with_certificate_authority",
            "get_module",
            "get_modules",
            "delete_module",
            "get_module_twin",
            "replace_module_twin",
            "update_module_twin",
        )
    },
    **{f"{cls.__name__}.from_connection_string": _by_connection_string(cls) for cls in SERVICE_CLASSES},
    "IoTHubRegistryManager.create_device_with_sas": _get_or_create,
    "IoTHubRegistryManager.create_device_with_x509": _update_x509,
    "IoTHubRegistryManager.create_device_with_certificate_authority": _update_ca,
    "IoTHubRegistryManager.update_device_with_sas": _update_sas,
    "IoTHubRegistryManager.update_device_with_x509": _update_x509,
    "IoTHubRegistryManager.update_device_with_certificate_authority": _update_ca,
    "IoTHubRegistryManager.get_device": _get_or_create,
    "IoTHubRegistryManager.delete_device": _delete,
    "IoTHubRegistryManager.get_devices": lambda s: (
        ([s.device(), s.device()] and len(s.registry.get_devices()) >= 2) or pytest.fail("get_devices")
    ),
    "IoTHubRegistryManager.get_device_registry_statistics": lambda s: (
        s.registry.get_device_registry_statistics().total_device_count >= 0 or pytest.fail()
    ),
    "IoTHubRegistryManager.get_service_statistics": lambda s: (
        s.registry.get_service_statistics().connected_device_count >= 0 or pytest.fail()
    ),
    "IoTHubRegistryManager.bulk_create_or_update_devices": _bulk,
    "IoTHubRegistryManager.query_iot_hub": _query,
    "IoTHubRegistryManager.get_twin": lambda s: s.registry.get_twin(s.device()).etag or pytest.fail(),
    "IoTHubRegistryManager.replace_twin": lambda s: (
        s.registry.replace_twin(s.device(), _twin_patch()).tags == {"site": "north"}
        or pytest.fail("replace_twin")
    ),
    "IoTHubRegistryManager.update_twin": lambda s: (
        s.registry.update_twin(s.device(), _twin_patch(), "*").properties.desired["rate"] == 2
        or pytest.fail("update_twin")
    ),
    "IoTHubHttpRuntimeManager.receive_feedback_notification": _feedback,
    "IoTHubHttpRuntimeManager.complete_feedback_notification": _feedback,
    "IoTHubHttpRuntimeManager.abandon_feedback_notification": _feedback,
    **FLEET_CALLS,  # IoTHubJobManager, IoTHubConfigurationManager
}

# Not-yet operations answer 501 NotImplemented, except bearer tokens: one from no configured OIDC provider
# is refused as any credential Tether cannot verify (401).
EXPECTED_STATUS = {
    f"{cls.__name__}.from_token_credential": (401, "IotHubUnauthorizedAccess") for cls in SERVICE_CLASSES
}
NOT_YET: dict[str, Callable[[Service], Any]] = {
    **{f"{cls.__name__}.from_token_credential": _by_token_credential(cls) for cls in SERVICE_CLASSES},
    "DigitalTwinClient.get_digital_twin": lambda s: s.digital.get_digital_twin(s.device()),
    "DigitalTwinClient.update_digital_twin": lambda s: s.digital.update_digital_twin(
        s.device(), [{"op": "add", "path": "/x", "value": 1}]
    ),
    "DigitalTwinClient.invoke_command": lambda s: s.digital.invoke_command(s.device(), "reboot", {}),
    "DigitalTwinClient.invoke_component_command": lambda s: s.digital.invoke_component_command(
        s.device(), "thermostat1", "reboot", {}
    ),
}
# Covered by the device-client tests below (they need a connected device or AMQP).
ELSEWHERE = {
    "IoTHubRegistryManager.invoke_device_method",
    "IoTHubRegistryManager.invoke_device_module_method",
    "IoTHubRegistryManager.send_c2d_message",
}
SERVICE_METHODS = sorted(
    m
    for m in STATUS
    if m not in ELSEWHERE
    and m.split(".")[0]
    in (
        "IoTHubRegistryManager",
        "IoTHubJobManager",
        "IoTHubConfigurationManager",
        "IoTHubHttpRuntimeManager",
        "DigitalTwinClient",
    )
)


@pytest.fixture(scope="module")
def service(azure_hub: AzureHub) -> Service:
    return Service(azure_hub)


@pytest.mark.parametrize("method", SERVICE_METHODS)
def test_service_sdk_method(method: str, service: Service) -> None:
    if STATUS[method] == "supported":
        SUPPORTED[method](service)
        return
    with pytest.raises(HttpOperationError) as refused:
        NOT_YET[method](service)
    response = refused.value.response
    status, code = EXPECTED_STATUS.get(method, (501, "NotImplemented"))
    assert response.status_code == status, response.text
    assert response.headers["iothub-errorcode"] == code
    assert response.json()["Message"].startswith(f"ErrorCode:{code};")


def test_every_service_method_has_a_call() -> None:
    for method in SERVICE_METHODS:
        table = SUPPORTED if STATUS[method] == "supported" else NOT_YET
        assert method in table, f"{method} ({STATUS[method]}) has no call in this file"


# --- the device SDK (and the service calls that need a connected device) -----------------------------
def _device_client(hub: AzureHub, device_id: str, key: str, *, websockets: bool) -> IoTHubDeviceClient:
    cs = f"HostName={hub.ip};DeviceId={device_id};SharedAccessKey={key}"
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=hub.root_ca.read_text(), websockets=websockets, connection_retry=False
    )


def _send_c2d(hub: AzureHub, device_id: str, body: bytes) -> None:
    with hub.rest() as rest:
        assert rest.post(f"/devices/{device_id}/messages/deviceBound?{API}", content=body).status_code == 201


def _desired(registry: IoTHubRegistryManager, device_id: str, rate: int) -> None:
    registry.update_twin(device_id, Twin(properties=TwinProperties(desired={"rate": rate})), "*")


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt-8883", "websockets-443"])
def test_device_client_walk(websockets: bool, azure_hub: AzureHub, service: Service) -> None:
    """Every IoTHubDeviceClient method over MQTT (8883) and MQTT over WebSockets (443): first with the
    blocking receive APIs, then (a client may use only one style) with the handlers; with the service
    calls that need a connected device (invoke_device_method) and C2D (Tether's REST send)."""
    registry = service.registry
    device_id = f"walk-{uuid.uuid4().hex[:8]}"
    key = new_key()
    registry.create_device_with_sas(device_id, key, new_key(), "enabled")

    client = _device_client(azure_hub, device_id, key, websockets=websockets)
    try:
        client.connect()
        assert client.connected
        wait_for(lambda: registry.get_service_statistics().connected_device_count >= 1, "a connected device")
        client.send_message(
            Message(
                '{"t": 1}', message_id="walk-1", content_type="application/json", content_encoding="utf-8"
            )
        )
        _send_c2d(azure_hub, device_id, b"c2d-1")
        assert client.receive_message(timeout=30).data == b"c2d-1"
        twin = client.get_twin()
        assert "desired" in twin and "reported" in twin
        client.patch_twin_reported_properties({"fw": "1.0"})
        wait_for(
            lambda: registry.get_twin(device_id).properties.reported.get("fw") == "1.0", "the reported patch"
        )
        # the first receive call subscribes (desired patches are not queued for absent subscribers)
        assert client.receive_twin_desired_properties_patch(timeout=0.5) is None
        _desired(registry, device_id, 3)
        assert client.receive_twin_desired_properties_patch(timeout=30)["rate"] == 3
        assert client.receive_method_request("ping", timeout=0.5) is None  # subscribes to methods
        answer: dict[str, Any] = {}

        def invoke() -> None:
            answer["result"] = registry.invoke_device_method(
                device_id,
                CloudToDeviceMethod(method_name="ping", payload=None, response_timeout_in_seconds=30),
            )

        caller = threading.Thread(target=invoke)
        caller.start()
        request = client.receive_method_request("ping", timeout=30)
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, "pong"))
        caller.join(60)
        assert (answer["result"].status, answer["result"].payload) == (201, "pong")
        # a module the device does not have: Azure's typed 404 (module calls: test_module_client_walk)
        with pytest.raises(HttpOperationError) as missing:
            registry.invoke_device_module_method(
                device_id,
                "m1",
                CloudToDeviceMethod(method_name="x", payload=None, connect_timeout_in_seconds=0),
            )
        assert missing.value.response.headers["iothub-errorcode"] == "ModuleNotFound"
        # file upload: the SAS over HTTPS (443), the blob to storage as the SDK's sample does it, the
        # completion; the service hears of it (Tether's REST form of the notification queue)
        info = client.get_storage_info_for_blob("walk/log.txt")
        assert info["blobName"] == f"{device_id}/walk/log.txt" and info["sasToken"].startswith("?")
        url = f"https://{info['hostName']}/{info['containerName']}/{info['blobName']}{info['sasToken']}"
        BlobClient.from_blob_url(url, connection_verify=str(azure_hub.root_ca)).upload_blob(b"walked")
        client.notify_blob_upload_status(info["correlationId"], True, 201, "uploaded")
        with azure_hub.rest() as rest:
            note, _ = take_notification(rest, info["blobName"])
        assert note["deviceId"] == device_id and note["blobSizeInBytes"] == len(b"walked")
        with pytest.raises(device_errors.ClientError) as unknown:  # a correlation id it never got
            client.notify_blob_upload_status(info["correlationId"], True, 201, "again")
        assert "404" in str(unknown.value.__cause__), unknown.value.__cause__
        client.disconnect()
        assert not client.connected
    finally:
        client.shutdown()

    handlers = _device_client(azure_hub, device_id, key, websockets=websockets)
    states: list[bool] = []
    got: list[bytes] = []
    patches: list[dict[str, Any]] = []
    handlers.on_connection_state_change = lambda: states.append(handlers.connected)
    handlers.on_background_exception = lambda exc: None
    handlers.on_new_sastoken_required = lambda: None
    handlers.on_message_received = lambda m: got.append(m.data)
    handlers.on_twin_desired_properties_patch_received = patches.append
    handlers.on_method_request_received = lambda req: handlers.send_method_response(
        MethodResponse.create_from_method_request(req, 200, {"echo": req.payload})
    )
    try:
        handlers.connect()
        _send_c2d(azure_hub, device_id, b"c2d-2")
        wait_for(lambda: got == [b"c2d-2"], "the C2D handler")
        _desired(registry, device_id, 4)
        wait_for(lambda: patches and patches[-1]["rate"] == 4, "the desired handler")
        result = registry.invoke_device_method(
            device_id,
            CloudToDeviceMethod(method_name="echo", payload={"n": 1}, response_timeout_in_seconds=30),
        )
        assert (result.status, result.payload) == (200, {"echo": {"n": 1}})
    finally:
        handlers.shutdown()
    assert True in states


def test_other_device_client_constructors(azure_hub: AzureHub, service: Service) -> None:
    device_id = f"ctor-{uuid.uuid4().hex[:8]}"
    key = new_key()
    service.registry.create_device_with_sas(device_id, key, new_key(), "enabled")
    root = azure_hub.root_ca.read_text()
    by_key = IoTHubDeviceClient.create_from_symmetric_key(
        key, azure_hub.ip, device_id, server_verification_cert=root, connection_retry=False
    )
    by_token = IoTHubDeviceClient.create_from_sastoken(
        azure_hub.device_token(device_id, key), server_verification_cert=root, connection_retry=False
    )
    for client in (by_key, by_token):
        try:
            client.connect()
            client.send_message("hello")
            if client is by_token:  # a renewed token: the SDK reconnects with it at once
                client.update_sastoken(azure_hub.device_token(device_id, key))
                client.send_message("hello again")
                assert client.connected
        finally:
            client.shutdown()
    # X.509 devices: tests/security_e2e walks create_from_x509_certificate with real certificates.


def test_service_c2d_over_amqp(azure_hub: AzureHub, service: Service) -> None:
    """send_c2d_message dials AMQP on 5671 (uamqp: SASL MSSBCBS, CBS, sender to `/messages/devicebound`):
    the message is queued for the device with its properties. uamqp reads the CA from SSL_CERT_FILE, so
    the SDK runs in a child process."""
    device_id = service.device()
    args = {"cs": azure_hub.owner_cs, "device": device_id, "bodies": ["c2d-over-amqp"],
            "properties": {"zone": "kitchen", "iothub-ack": "full"}}
    env = dict(os.environ, SSL_CERT_FILE=str(azure_hub.root_ca))
    done = subprocess.run([sys.executable, str(SERVICE_SDK), json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and json.loads(lines[-1]) == {"ok": True}, done.stdout + done.stderr[-3000:]
    [queued] = azure_hub.node.call(azure_hub.hub.c2d.repo.peek(device_id))
    assert queued.body == b"c2d-over-amqp"
    assert queued.ack == "full" and dict(queued.properties) == {"zone": "kitchen"}


def _module_client(
    hub: AzureHub, device_id: str, module_id: str, key: str, *, websockets: bool = False
) -> IoTHubModuleClient:
    cs = f"HostName={hub.ip};DeviceId={device_id};ModuleId={module_id};SharedAccessKey={key}"
    return IoTHubModuleClient.create_from_connection_string(
        cs, server_verification_cert=hub.root_ca.read_text(), websockets=websockets, connection_retry=False
    )


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt-8883", "websockets-443"])
def test_module_client_walk(websockets: bool, azure_hub: AzureHub, service: Service) -> None:
    """Every IoTHubModuleClient method: the supported ones work over MQTT and WebSockets (443), with
    invoke_device_module_method; the IoT Edge ones fail cleanly or receive nothing."""
    registry = service.registry
    device_id = service.device()
    key = new_key()
    registry.create_module_with_sas(device_id, "walker", None, key, new_key())
    client = _module_client(azure_hub, device_id, "walker", key, websockets=websockets)
    try:
        client.connect()
        assert client.connected
        client.send_message(Message("from-module"))
        client.send_message_to_output(Message("alert"), "alerts")
        assert "desired" in client.get_twin()
        client.patch_twin_reported_properties({"fw": "2.0"})
        wait_for(
            lambda: registry.get_module_twin(device_id, "walker").properties.reported.get("fw") == "2.0",
            "the module's reported patch",
        )
        assert client.receive_twin_desired_properties_patch(timeout=0.5) is None  # subscribes
        registry.update_module_twin(
            device_id, "walker", Twin(properties=TwinProperties(desired={"r": 7})), "*"
        )
        assert client.receive_twin_desired_properties_patch(timeout=30)["r"] == 7
        assert client.receive_method_request("ping", timeout=0.5) is None  # subscribes
        answer: dict[str, Any] = {}

        def invoke() -> None:
            answer["result"] = registry.invoke_device_module_method(
                device_id,
                "walker",
                CloudToDeviceMethod(method_name="ping", payload=None, response_timeout_in_seconds=30),
            )

        caller = threading.Thread(target=invoke)
        caller.start()
        request = client.receive_method_request("ping", timeout=30)
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, "pong"))
        caller.join(60)
        assert (answer["result"].status, answer["result"].payload) == (200, "pong")
        # IoT Edge routing (not yet): the input subscription is accepted, nothing arrives
        assert client.receive_message_on_input("in1", timeout=1) is None
        with pytest.raises(Exception) as no_edge:
            client.invoke_method({"methodName": "x", "payload": None}, device_id)
        assert no_edge.value is not None
        client.disconnect()
    finally:
        client.shutdown()

    handlers = _module_client(azure_hub, device_id, "walker", key, websockets=websockets)
    states: list[bool] = []
    patches: list[dict[str, Any]] = []
    handlers.on_connection_state_change = lambda: states.append(handlers.connected)
    handlers.on_background_exception = lambda exc: None
    handlers.on_new_sastoken_required = lambda: None
    handlers.on_message_received = lambda message: None
    handlers.on_twin_desired_properties_patch_received = patches.append
    handlers.on_method_request_received = lambda req: handlers.send_method_response(
        MethodResponse.create_from_method_request(req, 200, {"echo": req.payload})
    )
    try:
        handlers.connect()
        registry.update_module_twin(
            device_id, "walker", Twin(properties=TwinProperties(desired={"r": 8})), "*"
        )
        wait_for(lambda: patches and patches[-1]["r"] == 8, "the module's desired handler")
        result = registry.invoke_device_module_method(
            device_id,
            "walker",
            CloudToDeviceMethod(method_name="echo", payload=1, response_timeout_in_seconds=30),
        )
        assert (result.status, result.payload) == (200, {"echo": 1})
    finally:
        handlers.shutdown()
    assert True in states
    events = [e for e in _device_events(azure_hub, device_id) if e["moduleId"] == "walker"]
    assert [e["body"] for e in events] == ["from-module", "alert"]
    assert events[1]["systemProperties"]["iothub-outputname"] == "alerts"


def _device_events(hub: AzureHub, device_id: str) -> list[dict[str, Any]]:
    with hub.rest() as rest:
        found: list[dict[str, Any]] = []
        for p in range(len(rest.get("/tether/events/partitions").json()["partitions"])):
            batch = rest.get(
                f"/tether/events/partitions/{p}/messages", params={"timeout": "0", "maxCount": "1000"}
            )
            found += [e for e in batch.json() if e["deviceId"] == device_id]
        return found


def test_module_client_tokens_and_edge_constructor(azure_hub: AzureHub, service: Service) -> None:
    registry = service.registry
    device_id = service.device()
    key = new_key()
    registry.create_module_with_sas(device_id, "tok", None, key, new_key())
    token = build_token(f"{azure_hub.ip}/devices/{device_id}/modules/tok", key, int(time.time()) + 3600)
    client = IoTHubModuleClient.create_from_sastoken(
        token, server_verification_cert=azure_hub.root_ca.read_text(), connection_retry=False
    )
    try:
        client.connect()
        client.update_sastoken(
            build_token(f"{azure_hub.ip}/devices/{device_id}/modules/tok", key, int(time.time()) + 7200)
        )
        client.send_message("renewed")
        assert client.connected
    finally:
        client.shutdown()
    # IoT Edge only (not yet): without an edge runtime's environment the SDK refuses to build a client
    with pytest.raises(Exception) as no_edge:
        IoTHubModuleClient.create_from_edge_environment()
    assert no_edge.value is not None
    # X.509 modules: tests/modules/test_modules_sdk.py connects one with create_from_x509_certificate.
