"""File upload notifications over AMQP (`/messages/serviceBound/filenotifications`) from the hub's durable
queue (`FileNotificationQueue`, the one `GET /messages/serviceBound/filenotifications` reads).

A Python device (`azure-iot-device` over MQTT: `get_storage_info_for_blob`, upload with
`azure-storage-blob` to Azurite, `notify_blob_upload_status`) uploads; Microsoft's Node.js service SDK
(`azure-iothub` `getFileNotificationReceiver`, Amqp) receives the notification. With python-qpid-proton as
the service: a released notification is offered again, an accepted one is gone for good. The hub on
127.0.0.60 (AMQPS 5671, HTTPS 443, MQTT 8883), Azurite on 127.0.0.62:443.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import proton
import pytest
from amqp_helpers import AmqpHub, proton_client, run_node_service, service_user
from azure.iot.device import IoTHubDeviceClient
from azure.storage.blob import BlobClient
from azurite_helpers import AzuriteServer, azurite_server  # noqa: F401  (the fixture)

IP = "127.0.0.60"
AZURITE_IP = "127.0.0.62"
pytestmark = [pytest.mark.usefixtures("node_sdk"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def amqp_hub(azurite_server: AzuriteServer,  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqpHub]:
    """This directory's hub, with file upload to Azurite."""
    account = azurite_server.account
    hub = AmqpHub(Path(tmp_path_factory.mktemp("amqp-files")), IP, sections={
        "blob": {"ca_file": azurite_server.ca_file},
        "file_upload": {"account_name": account.name, "account_key": account.key,
                        "blob_endpoint": account.endpoint, "container": "uploads"},
    })
    try:
        yield hub
    finally:
        hub.stop()


def upload_from_python_device(hub: AmqpHub, azurite: AzuriteServer, device_id: str, blob_name: str,
                              data: bytes) -> dict[str, Any]:
    """The device SDK's file upload, as Azure documents it; returns the SDK's storage info."""
    device = hub.create_device(device_id)
    client = IoTHubDeviceClient.create_from_connection_string(
        hub.connection_string(device), server_verification_cert=hub.ca_file.read_text(),
        connection_retry=False)
    try:
        info: dict[str, Any] = client.get_storage_info_for_blob(blob_name)
        url = f"https://{info['hostName']}/{info['containerName']}/{info['blobName']}{info['sasToken']}"
        BlobClient.from_blob_url(url, connection_verify=str(azurite.ca_file)).upload_blob(data)
        client.notify_blob_upload_status(info["correlationId"], True, 201, "uploaded")
        return info
    finally:
        client.shutdown()


def pending(hub: AmqpHub) -> int:
    return hub.call(hub.hub.file_uploads.notifications.pending())


def test_a_python_devices_upload_notification_reaches_the_node_service_sdk_over_amqp(
        amqp_hub: AmqpHub, azurite_server: AzuriteServer) -> None:  # noqa: F811
    data = b"reading,value\n" * 300
    info = upload_from_python_device(amqp_hub, azurite_server, "file-node", "logs/today.csv", data)
    assert pending(amqp_hub) == 1

    events = run_node_service(amqp_hub, 1)
    [notification] = [e for e in events if e["ev"] == "file-notification"]
    body = json.loads(notification["data"])
    assert body["deviceId"] == "file-node"
    assert body["blobName"] == info["blobName"] == "file-node/logs/today.csv"
    assert body["blobSizeInBytes"] == len(data)
    assert body["blobUri"].endswith("/uploads/file-node/logs/today.csv")
    assert body["lastUpdatedTime"] and body["enqueuedTimeUtc"]
    assert notification["properties"].get("iothub-connection-device-id") == "file-node"
    # the SDK's receiver accepts on arrival: the notification is completed, not offered again
    amqp_hub.wait(lambda: pending(amqp_hub) == 0, what="the accepted notification to be completed")


def test_a_released_notification_is_offered_again_an_accepted_one_is_gone(
        amqp_hub: AmqpHub, azurite_server: AzuriteServer) -> None:  # noqa: F811
    upload_from_python_device(amqp_hub, azurite_server, "file-proton", "a.bin", b"\x00" * 1000)
    user, password = service_user(amqp_hub)
    conn = proton_client(amqp_hub, user=user, password=password)
    try:
        receiver = conn.create_receiver("/messages/serviceBound/filenotifications")
        first = receiver.receive(timeout=60)
        receiver.release()  # abandon: the lock ends, the notification is offered again
        again = receiver.receive(timeout=60)
        assert json.loads(bytes(again.body)) == json.loads(bytes(first.body))
        receiver.accept()
        with pytest.raises(proton.Timeout):  # (proton sends the disposition while it waits) nothing more
            receiver.receive(timeout=3)
        amqp_hub.wait(lambda: pending(amqp_hub) == 0, what="the accepted notification to be completed")
    finally:
        conn.close()
    body = json.loads(bytes(first.body))
    assert body["deviceId"] == "file-proton" and body["blobSizeInBytes"] == 1000
