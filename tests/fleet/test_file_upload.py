"""File upload end to end with Microsoft's SDKs and real blob storage: the hub on 127.0.0.115 (HTTPS 443)
and Azurite on 127.0.0.116 (HTTPS 443, dev-PKI certificate). `azure-iot-device` asks for a SAS
(`get_storage_info_for_blob`), `azure-storage-blob` uploads to Azurite with it, the device notifies
(`notify_blob_upload_status`), and the service reads the notification (REST). The SAS is for one blob,
write-only, short-lived: Azurite refuses it for another device's path, for reading, and once expired."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.iot.device import IoTHubDeviceClient
from azure.iot.device.exceptions import ClientError, ServiceError
from azure.storage.blob import BlobClient
from azurite_helpers import AzuriteServer
from fleet_helpers import API, RunningHub

HUB_IP = "127.0.0.115"
AZURITE_IP = "127.0.0.116"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hub(azurite_server: AzuriteServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    account = azurite_server.account
    running = RunningHub(
        Path(tmp_path_factory.mktemp("hub")),
        HUB_IP,
        pki_dir=azurite_server.ca_file.parent,
        blob={"ca_file": azurite_server.ca_file},
        file_upload={
            "account_name": account.name,
            "account_key": account.key,
            "blob_endpoint": account.endpoint,
            "container": "uploads",
            "max_in_flight": 3,
            "sas_ttl_s": 600,
        },
    )
    try:
        yield running
    finally:
        running.stop()


def device_client(hub: RunningHub, device_id: str) -> IoTHubDeviceClient:
    device = hub.create_device(device_id)
    return IoTHubDeviceClient.create_from_connection_string(
        hub.device_connection_string(device),
        server_verification_cert=hub.ca_file.read_text(),
        connection_retry=False,
    )


def blob_url(info: dict[str, Any], blob_name: str | None = None) -> str:
    name = blob_name or info["blobName"]
    return f"https://{info['hostName']}/{info['containerName']}/{name}{info['sasToken']}"


def test_sdk_upload_reaches_storage_and_the_service_hears_of_it(
    hub: RunningHub, azurite_server: AzuriteServer
) -> None:
    client = device_client(hub, "up-dev-a")
    try:
        info = client.get_storage_info_for_blob("logs/today.txt")
        assert info["blobName"] == "up-dev-a/logs/today.txt"
        assert info["containerName"] == "uploads" and info["hostName"] == azurite_server.account.host_name
        assert info["sasToken"].startswith("?") and "sr=b" in info["sasToken"] and "sp=cw" in info["sasToken"]
        data = b"line one\nline two\n" * 100
        BlobClient.from_blob_url(blob_url(info), connection_verify=str(azurite_server.ca_file)).upload_blob(
            data
        )
        client.notify_blob_upload_status(info["correlationId"], True, 201, "uploaded")
    finally:
        client.shutdown()

    with hub.rest("service") as rest:
        r = rest.get(f"/messages/serviceBound/filenotifications{API}&timeout=10")
        assert r.status_code == 200, r.text
        (note,) = r.json()
        assert note["deviceId"] == "up-dev-a" and note["blobName"] == "up-dev-a/logs/today.txt"
        assert note["blobSizeInBytes"] == len(data)
        assert note["blobUri"] == f"{azurite_server.account.endpoint}/uploads/up-dev-a/logs/today.txt"
        assert note["enqueuedTimeUtc"].endswith("Z") and note["lastUpdatedTime"].endswith("Z")
        lock = r.headers["ETag"].strip('"')
        assert rest.delete(f"/messages/serviceBound/filenotifications/{lock}{API}").status_code == 204
        assert rest.get(f"/messages/serviceBound/filenotifications{API}").status_code == 204
        # the lock is gone once completed
        assert rest.delete(f"/messages/serviceBound/filenotifications/{lock}{API}").status_code == 412
    assert any(r.target == "up-dev-a" for r in hub.audit("file.notify", "ok"))


def test_abandoned_notification_is_offered_again(hub: RunningHub, azurite_server: AzuriteServer) -> None:
    client = device_client(hub, "up-dev-abandon")
    try:
        info = client.get_storage_info_for_blob("x.bin")
        BlobClient.from_blob_url(blob_url(info), connection_verify=str(azurite_server.ca_file)).upload_blob(
            b"x"
        )
        client.notify_blob_upload_status(info["correlationId"], True, 201, "")
    finally:
        client.shutdown()
    with hub.rest("service") as rest:
        first = rest.get(f"/messages/serviceBound/filenotifications{API}&timeout=10")
        lock = first.headers["ETag"].strip('"')
        assert rest.post(f"/messages/serviceBound/filenotifications/{lock}/abandon{API}").status_code == 204
        again = rest.get(f"/messages/serviceBound/filenotifications{API}&timeout=10")
        assert again.status_code == 200 and again.json() == first.json()
        assert (
            rest.delete(
                f"/messages/serviceBound/filenotifications/{again.headers['ETag'].strip(chr(34))}{API}"
            ).status_code
            == 204
        )


def test_sas_is_for_one_blob_write_only(hub: RunningHub, azurite_server: AzuriteServer) -> None:
    client = device_client(hub, "up-dev-b")
    hub.create_device("up-dev-c")
    try:
        info = client.get_storage_info_for_blob("secret.txt")
    finally:
        client.shutdown()
    verify = str(azurite_server.ca_file)
    # device B's SAS used on device C's path: storage refuses it
    with pytest.raises(HttpResponseError) as other:
        BlobClient.from_blob_url(blob_url(info, "up-dev-c/secret.txt"), connection_verify=verify).upload_blob(
            b"x"
        )
    assert other.value.status_code == 403
    own = BlobClient.from_blob_url(blob_url(info), connection_verify=verify)
    own.upload_blob(b"mine")
    with pytest.raises(HttpResponseError) as read:  # no read right
        own.download_blob().readall()
    assert read.value.status_code == 403


def test_expired_sas_is_refused_by_storage(hub: RunningHub, azurite_server: AzuriteServer) -> None:
    service = hub.hub.file_uploads
    assert service.account is not None
    past = datetime.now(UTC) - timedelta(seconds=service.settings.sas_ttl_s + 400)
    sas = service.account.blob_sas(
        "uploads", "up-dev-a/late.txt", ttl_s=service.settings.sas_ttl_s, create=True, write=True, now=past
    )
    url = f"https://{service.account.host_name}/uploads/up-dev-a/late.txt?{sas}"
    with pytest.raises(HttpResponseError) as refused:
        BlobClient.from_blob_url(url, connection_verify=str(azurite_server.ca_file)).upload_blob(b"late")
    assert refused.value.status_code == 403


def test_completion_is_the_devices_own_and_uploads_in_flight_are_capped(hub: RunningHub) -> None:
    owner = hub.create_device("up-dev-d")
    intruder = hub.create_device("up-dev-e")
    import httpx

    def device_http(device: Any) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://{HUB_IP}",
            verify=str(hub.ca_file),
            timeout=30,
            headers={"Authorization": hub.device_token(device)},
        )

    with device_http(owner) as mine, device_http(intruder) as other:
        sas = [mine.post(f"/devices/up-dev-d/files{API}", json={"blobName": f"f{i}.txt"}) for i in range(3)]
        assert [r.status_code for r in sas] == [200, 200, 200]
        over = mine.post(f"/devices/up-dev-d/files{API}", json={"blobName": "f4.txt"})
        assert over.status_code == 403 and over.json()["errorCode"] == "IotHubQuotaExceeded"
        correlation = sas[0].json()["correlationId"]
        # another device cannot complete it, through its own path or the owner's
        stolen = other.post(
            f"/devices/up-dev-e/files/notifications{API}",
            json={"correlationId": correlation, "isSuccess": False},
        )
        assert stolen.status_code == 404
        assert (
            other.post(
                f"/devices/up-dev-d/files/notifications{API}",
                json={"correlationId": correlation, "isSuccess": False},
            ).status_code
            == 401
        )
        # Node's form: correlation id in the path; a failed upload frees the slot without a notification
        done = mine.post(
            f"/devices/up-dev-d/files/notifications/{correlation}{API}",
            json={"isSuccess": False, "statusCode": 500, "statusDescription": "gave up"},
        )
        assert done.status_code == 204
        assert mine.post(f"/devices/up-dev-d/files{API}", json={"blobName": "f4.txt"}).status_code == 200
        bad = mine.post(f"/devices/up-dev-d/files{API}", json={"blobName": "../up-dev-e/x"})
        assert bad.status_code == 400
    assert any(
        r.target == "up-dev-e" and r.reason == "unknown-correlation-id"
        for r in hub.audit("file.notify", "refused")
    )
    assert any(r.target == "up-dev-d" for r in hub.audit("file.sas", "refused"))


def test_notifications_need_service_connect(hub: RunningHub) -> None:
    with hub.rest("registryRead") as rest:
        r = rest.get(f"/messages/serviceBound/filenotifications{API}")
    assert r.status_code == 403
    assert any(
        r.reason == "missing-permission" or r.outcome == "refused" for r in hub.audit("auth.rest", "refused")
    )


def test_sdk_reports_an_unknown_correlation_id_as_an_error(hub: RunningHub) -> None:
    client = device_client(hub, "up-dev-f")
    try:
        with pytest.raises((ServiceError, ClientError)):  # the SDK wraps the 404 it gets
            client.notify_blob_upload_status("not-a-real-correlation-id", True, 201, "")
    finally:
        client.shutdown()
    assert any(
        r.target == "up-dev-f" and r.reason == "unknown-correlation-id"
        for r in hub.audit("file.notify", "refused")
    )
