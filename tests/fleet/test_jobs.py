"""Jobs end to end with Microsoft's SDKs: `IoTHubJobManager` schedules a twin update and a direct method
over a 1,000-device query on a hub on 127.0.0.115; five real `azure-iot-device` clients answer the
method, the others are recorded as failed (not online); every outcome is in `devices.jobs`. A hub
stopped mid-job resumes it after a restart without repeating finished devices. Export then import
round-trips the registry through Azurite (127.0.0.116). Rights are checked and refusals audited."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device import IoTHubDeviceClient, MethodResponse
from azure.iot.hub import IoTHubJobManager
from azure.iot.hub.models import CloudToDeviceMethod, JobProperties, JobRequest, Twin, TwinProperties
from azurite_helpers import AzuriteServer
from fleet_helpers import API, RunningHub, new_key, wait_for

HUB_IP = "127.0.0.115"
AZURITE_IP = "127.0.0.116"
FLEET = 1000
pytestmark = pytest.mark.timeout(300)


def _import(hub: RunningHub, prefix: str, count: int) -> None:
    records = [
        {
            "deviceId": f"{prefix}{i:04d}",
            "authentication": {
                "type": "sas",
                "symmetricKey": {"primaryKey": new_key(), "secondaryKey": new_key()},
            },
        }
        for i in range(count)
    ]
    hub.call(hub.hub.registry.import_devices(records, actor="test"))


@pytest.fixture(scope="module")
def hub(azurite_server: AzuriteServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    running = RunningHub(
        Path(tmp_path_factory.mktemp("jobs-hub")),
        HUB_IP,
        pki_dir=azurite_server.ca_file.parent,
        blob={"ca_file": azurite_server.ca_file},
        jobs={"poll_interval_s": 0.2},
    )
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(running.ca_file)  # azure-iot-hub (requests) trusts the dev CA
    try:
        _import(running, "job-", FLEET)
        yield running
    finally:
        running.stop()
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous


def job_status(
    manager: IoTHubJobManager, job_id: str, *, done: tuple[str, ...] = ("completed", "failed")
) -> Any:
    return wait_for(
        lambda: (j := manager.get_scheduled_job(job_id)).status in done and j,
        timeout=240,
        what=f"job {job_id} to finish",
        interval=0.5,
    )


def device_jobs(hub: RunningHub, job_id: str, status: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token = None
    with hub.rest("registryRead") as rest:
        while True:
            headers = {"x-ms-max-item-count": "1000", **({"x-ms-continuation": token} if token else {})}
            r = rest.post(
                f"/devices/query{API}",
                headers=headers,
                json={
                    "query": f"SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{job_id}' "
                    f"AND devices.jobs.status = '{status}'"
                },
            )
            assert r.status_code == 200, r.text
            items += r.json()
            token = r.headers.get("x-ms-continuation")
            if not token:
                return items


def test_twin_update_and_method_jobs_over_a_thousand_devices(hub: RunningHub) -> None:
    manager = IoTHubJobManager.from_connection_string(hub.connection_string())
    condition = "STARTSWITH(deviceId, 'job-')"
    twin_job = JobRequest(
        job_id="fw-rollout",
        type="scheduleUpdateTwin",
        query_condition=condition,
        start_time=None,
        max_execution_time_in_seconds=600,
        update_twin=Twin(etag="*", properties=TwinProperties(desired={"fw": {"v": 2}})),
    )
    created = manager.create_scheduled_job("fw-rollout", twin_job)
    assert created.job_id == "fw-rollout" and created.status in ("queued", "running", "completed")

    answered = [f"job-{i:04d}" for i in (3, 250, 500, 750, 999)]
    clients: list[IoTHubDeviceClient] = []
    try:
        for device_id in answered:
            device = hub.call(hub.hub.registry.get(device_id))
            client = IoTHubDeviceClient.create_from_connection_string(
                hub.device_connection_string(device),
                server_verification_cert=hub.ca_file.read_text(),
                connection_retry=False,
            )
            client.on_method_request_received = lambda req, c=client, d=device_id: c.send_method_response(
                MethodResponse.create_from_method_request(req, 200, {"rebooted": d, "echo": req.payload})
            )
            client.connect()
            clients.append(client)
        for device_id in answered:
            wait_for(
                lambda d=device_id: hub.hub.methods.online(d) is not None, what=f"{device_id} subscribed"
            )

        twin_done = job_status(manager, "fw-rollout")
        assert twin_done.status == "completed"
        stats = twin_done.device_job_statistics
        assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (FLEET, FLEET, 0)
        twin = hub.call(hub.hub.twins.get("job-0123"))
        assert twin["properties"]["desired"]["fw"] == {"v": 2}

        method_job = JobRequest(
            job_id="reboot",
            type="scheduleDeviceMethod",
            query_condition=condition,
            max_execution_time_in_seconds=600,
            cloud_to_device_method=CloudToDeviceMethod(
                method_name="reboot",
                payload={"delay": 1},
                response_timeout_in_seconds=10,
                connect_timeout_in_seconds=0,
            ),
        )
        manager.create_scheduled_job("reboot", method_job)
        done = job_status(manager, "reboot")
    finally:
        for client in clients:
            client.shutdown()
    stats = done.device_job_statistics
    assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (
        FLEET,
        len(answered),
        FLEET - 5,
    )
    completed = device_jobs(hub, "reboot", "completed")
    assert sorted(r["deviceId"] for r in completed) == answered
    for row in completed:
        assert row["jobType"] == "scheduleDeviceMethod"
        assert row["outcome"]["deviceMethodResponse"] == {
            "status": 200,
            "payload": {"rebooted": row["deviceId"], "echo": {"delay": 1}},
        }
    failed = device_jobs(hub, "reboot", "failed")
    assert len(failed) == FLEET - 5 and all(r["error"]["code"] == "DeviceNotOnline" for r in failed)

    query = manager.query_scheduled_jobs("scheduleDeviceMethod", "completed")
    assert [j["jobId"] for j in query.items] == ["reboot"]
    with pytest.raises(Exception):  # noqa: B017 - msrest's HttpOperationError: the job exists
        manager.create_scheduled_job("reboot", method_job)


def test_cancel_stops_a_scheduled_job(hub: RunningHub) -> None:
    manager = IoTHubJobManager.from_connection_string(hub.connection_string())
    later = JobRequest(
        job_id="later",
        type="scheduleUpdateTwin",
        query_condition="*",
        start_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)),
        update_twin=Twin(etag="*", tags={"x": 1}),
    )
    assert manager.create_scheduled_job("later", later).status == "scheduled"
    cancelled = manager.cancel_scheduled_job("later")
    assert cancelled.status == "cancelled"
    assert manager.get_scheduled_job("later").status == "cancelled"


def test_jobs_need_the_right_permissions(hub: RunningHub) -> None:
    body = {
        "jobId": "nope",
        "type": "scheduleDeviceMethod",
        "queryCondition": "*",
        "cloudToDeviceMethod": {"methodName": "m", "responseTimeoutInSeconds": 5},
    }
    with hub.rest("registryRead") as reader:
        assert reader.put(f"/jobs/v2/nope{API}", json=body).status_code == 403
        assert reader.get(f"/jobs/v2/query{API}").status_code == 200
        assert reader.post(f"/jobs/create{API}", json={"type": "export"}).status_code == 403
    with hub.rest("registryReadWrite") as writer:  # no ServiceConnect: may not call devices
        r = writer.put(f"/jobs/v2/nope{API}", json=body)
        assert r.status_code == 403, r.text
    refused = hub.audit("auth.rest", "refused")
    assert any(
        r.reason == "missing-permission" and r.details.get("operation") == "a device method job"
        for r in refused
    )
    assert sum(1 for r in refused if r.principal == "policy:registryRead") >= 2


def test_export_then_import_round_trips_the_registry(hub: RunningHub, azurite_server: AzuriteServer) -> None:
    account = azurite_server.account
    container = "registry-backup"
    hub.call(_ensure(account, container))
    sas_uri = account.container_url(
        container,
        account.container_sas(container, ttl_s=3600, read=True, write=True, create=True, list_=True),
    )
    originals = {d: hub.call(hub.hub.registry.get(d)) for d in ("job-0001", "job-0002", "job-0003")}
    hub.call(hub.hub.twins.patch("job-0002", {"tags": {"site": "north"}}, if_match=None, actor="test"))
    module = hub.call(hub.hub.modules.create("job-0001", "edge", {}, actor="test"))
    module_twin = {"tags": {"role": "gateway"}, "properties": {"desired": {"rate": 5}}}
    hub.call(hub.hub.twins.patch("job-0001", module_twin, if_match=None, actor="test", module_id="edge"))
    manager = IoTHubJobManager.from_connection_string(hub.connection_string())
    export = manager.create_import_export_job(
        JobProperties(type="export", output_blob_container_uri=sas_uri, exclude_keys_in_export=False)
    )
    assert export.status in ("enqueued", "running", "completed")
    finished = wait_for(
        lambda: (j := manager.get_import_export_job(export.job_id)).status in ("completed", "failed") and j,
        timeout=120,
        what="export",
    )
    assert finished.status == "completed", finished.failure_reason
    assert "?" not in (finished.output_blob_container_uri or "")  # the SAS is never echoed
    blob = hub.call(_download(account, container, "devices.txt")).decode().splitlines()
    assert len(blob) == FLEET + 1  # every device, then the module
    import json

    entries = [json.loads(line) for line in blob]
    lines = {e["id"]: e for e in entries if "moduleId" not in e}
    assert lines["job-0002"]["tags"] == {"site": "north"}
    assert (
        lines["job-0001"]["authentication"]["symmetricKey"]["primaryKey"]
        == originals["job-0001"].authentication.symmetric_key.primary_key
    )
    module_line = entries[-1]
    assert (module_line["id"], module_line["moduleId"]) == ("job-0001", "edge")
    assert module_line["authentication"]["symmetricKey"] == module.authentication.symmetric_key.model_dump(
        by_alias=True)
    assert module_line["tags"] == {"role": "gateway"}
    assert module_line["properties"]["desired"] == {"rate": 5}

    for device_id in originals:
        hub.call(hub.hub.registry.delete(device_id, if_match=None, actor="test"))
    imported = manager.create_import_export_job(
        JobProperties(type="import", input_blob_container_uri=sas_uri, output_blob_container_uri=sas_uri)
    )
    done = wait_for(
        lambda: (j := manager.get_import_export_job(imported.job_id)).status in ("completed", "failed") and j,
        timeout=180,
        what="import",
    )
    assert done.status == "completed", done.failure_reason
    for device_id, before in originals.items():
        after = hub.call(hub.hub.registry.get(device_id))
        assert after.authentication.symmetric_key == before.authentication.symmetric_key
    assert hub.call(hub.hub.twins.get("job-0002"))["tags"] == {"site": "north"}
    restored = hub.call(hub.hub.modules.get("job-0001", "edge"))  # deleted with its device, imported
    assert restored.authentication.symmetric_key == module.authentication.symmetric_key
    twin = hub.call(hub.hub.twins.get("job-0001", "edge"))
    assert twin["tags"] == {"role": "gateway"} and twin["properties"]["desired"]["rate"] == 5
    assert {j.job_id for j in manager.get_import_export_jobs()} >= {export.job_id, imported.job_id}


def test_import_applies_module_lines_and_logs_those_it_cannot(
    hub: RunningHub, azurite_server: AzuriteServer
) -> None:
    """Lines with `moduleId` are module identities of the line's device: created, replaced (keys kept,
    module twin patched), deleted; a module of a missing device, a duplicate create and a stale etag
    land in importErrors.log with the module's id, and the other lines still apply."""
    import json

    account = azurite_server.account
    container = "module-import"
    hub.call(_ensure(account, container))
    sas_uri = account.container_url(
        container,
        account.container_sas(container, ttl_s=3600, read=True, write=True, create=True, list_=True),
    )
    hub.call(hub.hub.modules.create("job-0010", "old", {}, actor="test"))
    hub.call(hub.hub.modules.create("job-0010", "kept", {}, actor="test"))
    key = new_key()
    sas = {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": new_key()}}
    lines = [
        {"id": "mod-new", "importMode": "create", "authentication": {"type": "sas"}},
        {"id": "mod-new", "moduleId": "camera", "importMode": "create", "authentication": sas,
         "tags": {"kind": "camera"}},
        {"id": "job-0010", "moduleId": "old", "importMode": "delete"},
        {"id": "job-0010", "moduleId": "kept", "importMode": "updateTwin",
         "properties": {"desired": {"x": 1}}},
        {"id": "no-such-device", "moduleId": "m", "importMode": "createOrUpdate"},
        {"id": "job-0010", "moduleId": "kept", "importMode": "create"},
        {"id": "job-0010", "moduleId": "kept", "importMode": "updateIfMatchETag", "eTag": "stale"},
        {"id": "job-0010", "moduleId": 7},
    ]
    blob = "\n".join(json.dumps(line) for line in lines).encode()
    hub.call(_upload(account, container, "modules.txt", blob))
    manager = IoTHubJobManager.from_connection_string(hub.connection_string())
    job = manager.create_import_export_job(
        JobProperties(type="import", input_blob_container_uri=sas_uri, output_blob_container_uri=sas_uri,
                      input_blob_name="modules.txt")
    )
    done = wait_for(
        lambda: (j := manager.get_import_export_job(job.job_id)).status in ("completed", "failed") and j,
        timeout=120,
        what="import",
    )
    assert done.status == "completed", done.failure_reason
    camera = hub.call(hub.hub.modules.get("mod-new", "camera"))
    assert camera.authentication.symmetric_key.primary_key == key
    assert hub.call(hub.hub.twins.get("mod-new", "camera"))["tags"] == {"kind": "camera"}
    assert [m.module_id for m in hub.call(hub.hub.modules.list("job-0010"))] == ["kept"]
    assert hub.call(hub.hub.twins.get("job-0010", "kept"))["properties"]["desired"]["x"] == 1
    log = hub.call(_download(account, container, "importErrors.log"))
    errors = [json.loads(line) for line in log.splitlines()]
    assert [(e["line"], e["deviceId"], e.get("moduleId"), e["errorCode"]) for e in errors] == [
        (5, "no-such-device", "m", "DeviceNotFound"),
        (6, "job-0010", "kept", "ModuleAlreadyExistsOnDevice"),
        (7, "job-0010", "kept", "PreconditionFailed"),
        (8, "job-0010", None, "ArgumentInvalid"),
    ]


async def _upload(account: Any, container: str, blob: str, data: bytes) -> None:
    from tether.storage.blob import BlobStore

    async with BlobStore(account) as store:
        await store.upload(container, blob, data)


async def _ensure(account: Any, container: str) -> None:
    from tether.storage.blob import BlobStore

    async with BlobStore(account) as store:
        await store.ensure_container(container)


async def _download(account: Any, container: str, blob: str) -> bytes:
    from tether.storage.blob import BlobStore

    async with BlobStore(account) as store:
        return await store.download(container, blob)
