"""Every REST operation of the catalogue, over raw HTTPS to `https://127.0.0.80` (port 443, as Azure):
supported ones behave as Azure's SDKs expect (paths as the SDKs spell them, Azure's error body and
`iothub-errorcode` header, `If-Match` quoted or not, `x-ms-continuation` only when a page follows);
not-yet ones answer 501 NotImplemented in Azure's shape. Also checks the catalogue against Azure's
operation list (the azure-iot-hub protocol layer, generated from the 2021-04-12 REST specification)."""

from __future__ import annotations

import base64
import inspect
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from azure_errors import assert_azure_error
from catalogue import OPERATIONS, Operation, shape
from conformance_kit import API, AzureHub, create, device_client
from fleet_probes import FLEET_PROBES
from sdk_table import status_of

from tether.api.app import FEATURES
from tether.security.sas import build_token

REST_OPS = [op for op in OPERATIONS if op.rest]


# --- Azure's operation list -------------------------------------------------------------------------
def sdk_protocol_operations() -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in azure-iot-hub's generated protocol layer."""
    from azure.iot.hub.protocol import operations

    found: set[tuple[str, str]] = set()
    for _, group in inspect.getmembers(operations, inspect.isclass):
        source = inspect.getsource(group)
        for name, fn in inspect.getmembers(group, inspect.isfunction):
            url = getattr(fn, "metadata", {}).get("url")
            if url is None:
                continue
            body = inspect.getsource(fn)
            verb = re.findall(r"request = self\._client\.(\w+)\(", body)
            assert verb, f"{group.__name__}.{name}: no request verb"
            found.add(shape(verb[-1], url))
        assert source
    return found


def test_catalogue_covers_every_operation_of_azures_rest_specification() -> None:
    spec = sdk_protocol_operations()
    assert len(spec) >= 40  # 2021-04-12: 42 operations
    listed = {shape(op.method, op.path) for op in REST_OPS}
    assert spec - listed == set(), "operations of the REST specification missing from the catalogue"


WEBSOCKET_TRANSPORTS = ("/$iothub/websocket", "/$servicebus/websocket")  # transports, not operations


def test_every_azure_route_of_the_hub_is_in_the_catalogue() -> None:
    """Each route is an operation's own request or one of its `also` (another SDK's spelling, or
    Tether's REST form of an AMQP operation)."""
    listed = {shape(op.method, op.path) for op in REST_OPS}
    listed |= {shape(method, path) for op in OPERATIONS for method, path in op.also}
    azure_routes = {
        shape(r.method, r.path)
        for f in FEATURES
        for r in f.routes
        if not r.extension and not r.path.startswith(WEBSOCKET_TRANSPORTS)
    }
    assert azure_routes - listed == set()


def test_every_rest_operation_is_routed() -> None:
    for op in OPERATIONS:
        status_of(op)  # raises for an operation (or an `also` request) without a route


# --- probes of the supported operations -------------------------------------------------------------
def probe_get_devices(hub: AzureHub, rest: httpx.Client) -> None:
    for _ in range(2):
        create(rest)
    r = rest.get(f"/devices/?{API}")  # Azure's SDKs list with a trailing slash
    assert r.status_code == 200 and len(r.json()) >= 2
    ids = sorted(d["deviceId"] for d in r.json())
    first = rest.get(f"/Devices?top=1&{API}")
    assert first.status_code == 200 and first.headers["x-ms-continuation"] == ids[0]
    last = rest.get(f"/devices?top=1&{API}", headers={"x-ms-continuation": ids[-2]})
    assert [d["deviceId"] for d in last.json()] == [ids[-1]]
    assert "x-ms-continuation" not in last.headers  # the last page says so by omitting the header


def probe_get_identity(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    r = rest.get(f"/DEVICES/{device_id}/?{API}")
    assert r.status_code == 200 and r.json()["deviceId"] == device_id and r.headers["ETag"]
    assert_azure_error(rest.get(f"/devices/no-{device_id}?{API}"), 404, "DeviceNotFound")


def probe_put_identity(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, doc = create(rest)
    again = rest.put(f"/devices/{device_id}?{API}", json={"deviceId": device_id})
    assert_azure_error(again, 409, "DeviceAlreadyExists")
    body = {**doc, "status": "disabled"}
    unquoted = rest.put(f"/devices/{device_id}?{API}", json=body, headers={"If-Match": doc["etag"]})
    assert unquoted.status_code == 200 and unquoted.json()["status"] == "disabled"
    stale = rest.put(f"/devices/{device_id}?{API}", json=body, headers={"If-Match": f'"{doc["etag"]}"'})
    assert_azure_error(stale, 412, "PreconditionFailed")


def probe_delete_identity(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, doc = create(rest)
    assert rest.delete(f"/devices/{device_id}?{API}", headers={"If-Match": doc["etag"]}).status_code == 204
    assert_azure_error(
        rest.delete(f"/devices/{device_id}?{API}", headers={"If-Match": "*"}), 404, "DeviceNotFound"
    )


def probe_bulk(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, doc = create(rest)
    # As Node's updateDevices(devices, forceUpdate=false) sends a device from a GET: `etag`, not `eTag`.
    entry = {**doc, "id": device_id, "importMode": "UpdateIfMatchETag", "status": "disabled"}
    r = rest.post(f"/devices?{API}", json=[entry])
    assert r.status_code == 200 and r.json()["isSuccessful"] is True, r.text
    stale = rest.post(f"/devices?{API}", json=[entry])  # that etag is now stale
    assert stale.status_code == 400 and stale.headers["iothub-errorcode"] == "PreconditionFailed"
    assert stale.json()["errors"][0]["errorCode"] == "PreconditionFailed"


def probe_device_statistics(hub: AzureHub, rest: httpx.Client) -> None:
    r = rest.get(f"/statistics/devices?{API}")
    assert r.status_code == 200 and set(r.json()) == {
        "totalDeviceCount",
        "enabledDeviceCount",
        "disabledDeviceCount",
    }


def probe_service_statistics(hub: AzureHub, rest: httpx.Client) -> None:
    r = rest.get(f"/statistics/service?{API}")
    assert r.status_code == 200 and isinstance(r.json()["connectedDeviceCount"], int)


def probe_get_twin(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    r = rest.get(f"/twins/{device_id}?{API}")
    assert r.status_code == 200 and r.json()["deviceId"] == device_id and r.headers["ETag"]
    assert_azure_error(rest.get(f"/twins/nobody-{device_id}?{API}"), 404, "DeviceNotFound")


def probe_replace_twin(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    etag = rest.get(f"/twins/{device_id}?{API}").json()["etag"]
    r = rest.put(f"/twins/{device_id}?{API}", json={"tags": {"site": "a"}}, headers={"If-Match": etag})
    assert r.status_code == 200 and r.json()["tags"] == {"site": "a"}, r.text


def probe_update_twin(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    etag = rest.get(f"/twins/{device_id}?{API}").json()["etag"]
    patch = {"properties": {"desired": {"rate": 5}}}
    r = rest.patch(f"/twins/{device_id}?{API}", json=patch, headers={"If-Match": etag})  # unquoted
    assert r.status_code == 200 and r.json()["properties"]["desired"]["rate"] == 5
    stale = rest.patch(f"/twins/{device_id}?{API}", json=patch, headers={"If-Match": f'"{etag}"'})
    assert_azure_error(stale, 412, "PreconditionFailed")


def probe_query(hub: AzureHub, rest: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    for _ in range(2):
        device_id, _, _ = create(rest)
        rest.patch(f"/twins/{device_id}?{API}", json={"tags": {"q": tag}})
    query = {"query": f"SELECT * FROM devices WHERE tags.q = '{tag}'"}
    first = rest.post(f"/devices/query?{API}", json=query, headers={"x-ms-max-item-count": "1"})
    assert first.status_code == 200 and len(first.json()) == 1 and first.headers["x-ms-item-type"]
    token = first.headers["x-ms-continuation"]
    last = rest.post(
        f"/devices/query?{API}", json=query, headers={"x-ms-max-item-count": "1", "x-ms-continuation": token}
    )
    assert len(last.json()) == 1 and "x-ms-continuation" not in last.headers
    assert_azure_error(rest.post(f"/devices/query?{API}", json={"query": "SELEC"}), 400, "ArgumentInvalid")


def probe_invoke_method(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    r = rest.post(
        f"/twins/{device_id}/methods?{API}",
        json={
            "methodName": "reboot",
            "payload": {},
            "responseTimeoutInSeconds": 5,
            "connectTimeoutInSeconds": 0,
        },
    )
    assert_azure_error(r, 404, "DeviceNotOnline")  # online calls: test_sdk_methods.py


def probe_invoke_module_method(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    call = {"methodName": "x", "payload": {}, "connectTimeoutInSeconds": 0}
    r = rest.post(f"/twins/{device_id}/modules/m1/methods?{API}", json=call)
    assert_azure_error(r, 404, "ModuleNotFound")
    _module(rest, device_id, "m1")
    r = rest.post(f"/twins/{device_id}/modules/m1/methods?{API}", json=call)
    assert_azure_error(r, 404, "DeviceNotOnline")  # online calls: test_sdk_methods.py


def _module(rest: httpx.Client, device_id: str, module_id: str) -> dict[str, Any]:
    r = rest.put(f"/devices/{device_id}/modules/{module_id}?{API}", json={"moduleId": module_id})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def probe_put_module(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    doc = _module(rest, device_id, "m1")
    assert doc["deviceId"] == device_id and doc["authentication"]["symmetricKey"]["primaryKey"]
    again = rest.put(f"/devices/{device_id}/modules/m1?{API}", json={"moduleId": "m1"})
    assert_azure_error(again, 409, "ModuleAlreadyExistsOnDevice")
    replaced = rest.put(
        f"/devices/{device_id}/Modules/m1/?{API}",
        json={**doc, "managedBy": "me"},
        headers={"If-Match": doc["etag"]},
    )  # unquoted etag, any case, trailing slash
    assert replaced.status_code == 200 and replaced.json()["managedBy"] == "me", replaced.text
    assert_azure_error(
        rest.put(f"/devices/nobody-{device_id}/modules/m1?{API}", json={}), 404, "DeviceNotFound"
    )


def probe_get_module(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    _module(rest, device_id, "m1")
    r = rest.get(f"/devices/{device_id}/modules/m1?{API}")
    assert r.status_code == 200 and r.json()["moduleId"] == "m1" and r.headers["ETag"]
    assert_azure_error(rest.get(f"/devices/{device_id}/modules/m2?{API}"), 404, "ModuleNotFound")


def probe_list_modules(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    for module_id in ("m1", "m2"):
        _module(rest, device_id, module_id)
    r = rest.get(f"/devices/{device_id}/modules/?{API}")
    assert r.status_code == 200 and [m["moduleId"] for m in r.json()] == ["m1", "m2"]


def probe_delete_module(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    doc = _module(rest, device_id, "m1")
    r = rest.delete(f"/devices/{device_id}/modules/m1?{API}", headers={"If-Match": f'"{doc["etag"]}"'})
    assert r.status_code == 204
    assert_azure_error(
        rest.delete(f"/devices/{device_id}/modules/m1?{API}", headers={"If-Match": "*"}),
        404,
        "ModuleNotFound",
    )


def probe_module_twin(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    _module(rest, device_id, "m1")
    twin = rest.get(f"/twins/{device_id}/modules/m1?{API}")
    assert twin.status_code == 200 and twin.json()["moduleId"] == "m1"
    etag = twin.json()["etag"]
    patched = rest.patch(
        f"/twins/{device_id}/modules/m1?{API}",
        json={"properties": {"desired": {"r": 1}}},
        headers={"If-Match": etag},
    )
    assert patched.status_code == 200 and patched.json()["properties"]["desired"]["r"] == 1
    replaced = rest.put(f"/twins/{device_id}/modules/m1?{API}", json={"tags": {"t": 1}})
    assert replaced.status_code == 200 and replaced.json()["tags"] == {"t": 1}
    assert_azure_error(rest.get(f"/twins/{device_id}/modules/m2?{API}"), 404, "ModuleNotFound")


def probe_purge(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    assert rest.post(f"/devices/{device_id}/messages/deviceBound?{API}", content=b"x").status_code == 201
    r = rest.delete(f"/devices/{device_id}/commands?{API}")
    assert r.status_code == 200 and r.json() == {"totalMessagesPurged": 1, "deviceId": device_id}


def probe_receive_feedback(hub: AzureHub, rest: httpx.Client) -> None:
    r = rest.get(f"/messages/serviceBound/feedback?timeout=0&{API}")
    assert r.status_code in (200, 204)


def probe_complete_feedback(hub: AzureHub, rest: httpx.Client) -> None:
    assert_azure_error(rest.delete(f"/messages/serviceBound/feedback/{uuid.uuid4()}?{API}"), 412)


def probe_abandon_feedback(hub: AzureHub, rest: httpx.Client) -> None:
    assert_azure_error(rest.post(f"/messages/serviceBound/feedback/{uuid.uuid4()}/abandon?{API}"), 412)


def _events(rest: httpx.Client, device_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for p in range(len(rest.get("/tether/events/partitions").json()["partitions"])):
        batch = rest.get(
            f"/tether/events/partitions/{p}/messages", params={"timeout": "0", "maxCount": "1000"}
        )
        found += [e for e in batch.json() if e["deviceId"] == device_id]
    return found


def probe_send_event(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, key, _ = create(rest)
    with device_client(hub, device_id, key) as device:
        one = device.post(
            f"/devices/{device_id}/messages/events?{API}",
            content=b'{"t":1}',
            headers={"iothub-app-zone": "a", "iothub-messageid": "single"},
        )
        assert one.status_code == 204, one.text
        batch = [
            {
                "body": base64.b64encode(b'{"t":2}').decode(),
                "properties": {"iothub-app-zone": "b", "iothub-messageid": "b1"},
            },
            {"body": base64.b64encode(b'{"t":3}').decode(), "properties": {"legacy": "c"}},
        ]
        r = device.post(
            f"/devices/{device_id}/messages/events?{API}",
            content=json.dumps(batch),
            headers={"Content-Type": "application/vnd.microsoft.iothub.json"},
        )
        assert r.status_code == 204, r.text
        bad = device.post(
            f"/devices/{device_id}/messages/events?{API}",
            content=b'[{"body": "%%%"}]',
            headers={"Content-Type": "application/vnd.microsoft.iothub.json"},
        )
        assert_azure_error(bad, 400, "ArgumentInvalid")
    events = _events(rest, device_id)
    assert [e["body"] for e in events] == ['{"t":1}', '{"t":2}', '{"t":3}']  # one event per element
    assert [e["properties"] for e in events] == [{"zone": "a"}, {"zone": "b"}, {"legacy": "c"}]
    assert events[1]["systemProperties"]["message-id"] == "b1"


def probe_send_module_event(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    key = _module(rest, device_id, "m1")["authentication"]["symmetricKey"]["primaryKey"]
    with hub.rest() as module:
        module.headers["Authorization"] = build_token(
            f"{hub.ip}/devices/{device_id}/modules/m1", key, int(time.time()) + 3600
        )
        r = module.post(f"/devices/{device_id}/modules/m1/messages/events?{API}", content=b"from-module")
        assert r.status_code == 204, r.text
    (event,) = _events(rest, device_id)
    assert event["moduleId"] == "m1" and event["body"] == "from-module"


def _c2d(hub: AzureHub, rest: httpx.Client) -> tuple[str, httpx.Client]:
    device_id, key, _ = create(rest)
    assert (
        rest.post(
            f"/devices/{device_id}/messages/deviceBound?{API}",
            content=b"hello",
            headers={"iothub-app-k": "v"},
        ).status_code
        == 201
    )
    return device_id, device_client(hub, device_id, key)


def probe_receive_c2d(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, device = _c2d(hub, rest)
    with device:
        r = device.get(f"/devices/{device_id}/messages/devicebound?{API}")  # lower case, as the SDKs
        assert r.status_code == 200 and r.content == b"hello" and r.headers["iothub-app-k"] == "v"
        assert re.fullmatch(r'"[^"]+"', r.headers["ETag"])
        assert device.get(f"/devices/{device_id}/messages/devicebound?{API}").status_code == 204  # locked


def probe_complete_c2d(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, device = _c2d(hub, rest)
    with device:
        lock = device.get(f"/devices/{device_id}/messages/devicebound?{API}").headers["ETag"].strip('"')
        assert device.delete(f"/devices/{device_id}/messages/devicebound/{lock}?{API}").status_code == 204
        assert_azure_error(
            device.delete(f"/devices/{device_id}/messages/devicebound/{lock}?{API}"),
            412,
            "DeviceMessageLockLost",
        )
    device_id, device = _c2d(hub, rest)
    with device:
        lock = device.get(f"/devices/{device_id}/messages/devicebound?{API}").headers["ETag"].strip('"')
        r = device.delete(f"/devices/{device_id}/messages/devicebound/{lock}?reject&{API}")
        assert r.status_code == 204
        assert device.get(f"/devices/{device_id}/messages/devicebound?{API}").status_code == 204


def probe_abandon_c2d(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, device = _c2d(hub, rest)
    with device:
        first = device.get(f"/devices/{device_id}/messages/devicebound?{API}")
        lock = first.headers["ETag"].strip('"')
        assert (
            device.post(f"/devices/{device_id}/messages/devicebound/{lock}/abandon?{API}").status_code == 204
        )
        again = device.get(f"/devices/{device_id}/messages/devicebound?{API}")
        assert again.status_code == 200 and again.headers["iothub-deliverycount"] == "2"


PROBES: dict[str, Callable[[AzureHub, httpx.Client], None]] = {
    "Devices_GetDevices": probe_get_devices,
    "Devices_GetIdentity": probe_get_identity,
    "Devices_CreateOrUpdateIdentity": probe_put_identity,
    "Devices_DeleteIdentity": probe_delete_identity,
    "BulkRegistry_UpdateRegistry": probe_bulk,
    "Statistics_GetDeviceStatistics": probe_device_statistics,
    "Statistics_GetServiceStatistics": probe_service_statistics,
    "Devices_GetTwin": probe_get_twin,
    "Devices_ReplaceTwin": probe_replace_twin,
    "Devices_UpdateTwin": probe_update_twin,
    "Query_GetTwins": probe_query,
    "Devices_InvokeMethod": probe_invoke_method,
    "Modules_InvokeMethod": probe_invoke_module_method,
    "Module_SendModuleEvent": probe_send_module_event,
    "Modules_CreateOrUpdateIdentity": probe_put_module,
    "Modules_GetIdentity": probe_get_module,
    "Modules_GetModulesOnDevice": probe_list_modules,
    "Modules_DeleteIdentity": probe_delete_module,
    "Modules_GetTwin": probe_module_twin,
    "Modules_UpdateTwin": probe_module_twin,
    "Modules_ReplaceTwin": probe_module_twin,
    "CloudToDeviceMessages_PurgeCloudToDeviceMessageQueue": probe_purge,
    "CloudToDeviceMessages_ReceiveFeedbackNotification": probe_receive_feedback,
    "CloudToDeviceMessages_CompleteFeedbackNotification": probe_complete_feedback,
    "CloudToDeviceMessages_AbandonFeedbackNotification": probe_abandon_feedback,
    "Device_SendDeviceEvent": probe_send_event,
    "Device_ReceiveDeviceBoundNotification": probe_receive_c2d,
    "Device_CompleteDeviceBoundNotification": probe_complete_c2d,
    "Device_AbandonDeviceBoundNotification": probe_abandon_c2d,
    **FLEET_PROBES,
}


def _concrete(path: str, device_id: str) -> str:
    """A request path for a template: `{id}`-like parameters become the device id, others a word."""

    def value(match: re.Match[str]) -> str:
        return device_id if match[1] in ("id", "deviceId") else f"{match[1].lower()}1"

    return re.sub(r"\{(\w+)\}", value, path)


@pytest.mark.parametrize("op", REST_OPS, ids=[op.name for op in REST_OPS])
def test_rest_operation(op: Operation, azure_hub: AzureHub, rest: httpx.Client) -> None:
    status = status_of(op)
    if op.name in PROBES:
        PROBES[op.name](azure_hub, rest)
        return
    assert status == "not yet", f"{op.name} is supported but has no probe here"
    device_id, key, _ = create(rest)
    client = device_client(azure_hub, device_id, key) if op.area == "device https" else rest
    r = client.request(op.method, f"{_concrete(op.path, device_id)}?{API}", json={})
    body = assert_azure_error(r, 501, "NotImplemented")
    assert "not supported by Tether yet" in body["Message"]


def test_not_yet_operations_still_authenticate(azure_hub: AzureHub) -> None:
    with httpx.Client(base_url=f"https://{azure_hub.ip}", verify=str(azure_hub.root_ca)) as anon:
        assert_azure_error(anon.get(f"/digitaltwins/d1?{API}"), 401, "IotHubUnauthorizedAccess")
        r = anon.post(f"/digitaltwins/d1/commands/reboot?{API}", json={})
        assert_azure_error(r, 401, "IotHubUnauthorizedAccess")
