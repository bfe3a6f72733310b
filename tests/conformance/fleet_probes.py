"""Probes of the fleet operations for `test_rest_operations.py`, over raw HTTPS to the shared hub: scheduled
jobs (`/jobs/v2/…`), import/export (`/jobs/create`, `/jobs`) through the session's Azurite, automatic
configurations (`/configurations/…`, `applyConfigurationContent`) and device file upload (SAS, upload to
Azurite, completion in Python's and Node's forms, the service's notification queue).

Everything here targets its own devices (`deviceId IN [...]`, a fresh tag): the hub is shared with the
rest of the suite, so no job or configuration may touch another test's twins. Storage helpers:
storage_kit.py."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from azure_errors import assert_azure_error
from conformance_kit import API, UPLOADS, AzureHub, create, device_client, wait_for
from storage_kit import (
    StallingStorage,
    blob_bytes,
    container_sas_uri,
    put_blob,
    take_notification,
    upload_with_sas,
)


def _tag() -> str:
    return uuid.uuid4().hex[:10]


# --- scheduled jobs ------------------------------------------------------------------------------------
def _twin_job(devices: list[str], tag: str, **extra: Any) -> dict[str, Any]:
    ids = ", ".join(f"'{d}'" for d in devices)
    return {
        "jobId": f"conf-job-{tag}",
        "type": "scheduleUpdateTwin",
        "queryCondition": f"deviceId IN [{ids}]",
        "updateTwin": {"etag": "*", "properties": {"desired": {"jobbed": tag}}},
        "maxExecutionTimeInSeconds": 300,
        **extra,
    }


def _finished(rest: httpx.Client, path: str, timeout: float = 60) -> dict[str, Any]:
    """GET `path` (a job) until its status is final; every answer on the way must be a 200."""

    def done() -> dict[str, Any] | None:
        r = rest.get(f"{path}?{API}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, path, timeout)
    return result


def _later() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))


def probe_create_scheduled_job(hub: AzureHub, rest: httpx.Client) -> None:
    devices = [create(rest)[0] for _ in range(2)]
    tag = _tag()
    body = _twin_job(devices, tag)
    r = rest.put(f"/jobs/v2/{body['jobId']}?{API}", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["jobId"] == body["jobId"] and job["type"] == "scheduleUpdateTwin"
    assert job["status"] in ("queued", "running", "completed") and job["createdTime"].endswith("Z")
    assert job["queryCondition"] == body["queryCondition"] and job["updateTwin"]["properties"]
    assert set(job["deviceJobStatistics"]) >= {"deviceCount", "failedCount", "succeededCount"}
    assert_azure_error(rest.put(f"/jobs/v2/{body['jobId']}?{API}", json=body), 409, "JobAlreadyExists")
    assert_azure_error(
        rest.put(f"/jobs/v2/x-{tag}?{API}", json={**body, "jobId": f"x-{tag}", "type": "nope"}),
        400,
        "ArgumentInvalid",
    )
    assert _finished(rest, f"/jobs/v2/{body['jobId']}")["status"] == "completed"
    for device_id in devices:
        assert rest.get(f"/twins/{device_id}?{API}").json()["properties"]["desired"]["jobbed"] == tag


def probe_get_scheduled_job(hub: AzureHub, rest: httpx.Client) -> None:
    online_never, _, _ = create(rest)
    job_id = f"conf-method-{_tag()}"
    body = {
        "jobId": job_id,
        "type": "scheduleDeviceMethod",
        "queryCondition": f"deviceId IN ['{online_never}']",
        "cloudToDeviceMethod": {
            "methodName": "reboot",
            "payload": None,
            "responseTimeoutInSeconds": 5,
            "connectTimeoutInSeconds": 0,
        },
    }
    assert rest.put(f"/jobs/v2/{job_id}?{API}", json=body).status_code == 200
    done = _finished(rest, f"/jobs/v2/{job_id}")  # each GET on the way is checked by _finished
    assert done["status"] == "completed" and done["endTime"].endswith("Z")
    assert done["cloudToDeviceMethod"]["methodName"] == "reboot"
    stats = done["deviceJobStatistics"]  # the device was never online: its call failed, the job did not
    assert (stats["deviceCount"], stats["succeededCount"], stats["failedCount"]) == (1, 0, 1)
    assert_azure_error(rest.get(f"/jobs/v2/no-{job_id}?{API}"), 404, "JobNotFound")


def probe_cancel_scheduled_job(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    tag = _tag()
    body = _twin_job([device_id], tag, startTime=_later())
    job_id = body["jobId"]
    assert rest.put(f"/jobs/v2/{job_id}?{API}", json=body).json()["status"] == "scheduled"
    r = rest.post(f"/jobs/v2/{job_id}/cancel?{API}")  # no body, as the SDKs send it
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["jobId"] == job_id
    assert rest.get(f"/jobs/v2/{job_id}?{API}").json()["status"] == "cancelled"
    assert "jobbed" not in rest.get(f"/twins/{device_id}?{API}").json()["properties"]["desired"]
    assert_azure_error(rest.post(f"/jobs/v2/no-{job_id}/cancel?{API}"), 404, "JobNotFound")


def probe_query_scheduled_jobs(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    body = _twin_job([device_id], _tag(), startTime=_later())
    assert rest.put(f"/jobs/v2/{body['jobId']}?{API}", json=body).status_code == 200
    try:
        query = f"/jobs/v2/query?jobType=scheduleUpdateTwin&jobStatus=scheduled&{API}"
        r = rest.get(query)  # Node and .NET read an array
        assert r.status_code == 200 and r.headers["x-ms-item-type"] == "jobResponse", r.text
        assert body["jobId"] in [j["jobId"] for j in r.json()]
        assert {j["status"] for j in r.json()} == {"scheduled"}
        # azure-iot-hub (msrest) deserialises a QueryResult object
        msrest = rest.get(
            query, headers={"User-Agent": "python/3.11 msrest/0.7.1 iothubgatewayserviceapis/2021-04-12"}
        )
        result = msrest.json()
        assert set(result) == {"type", "items", "continuationToken"} and result["continuationToken"] is None
        assert body["jobId"] in [j["jobId"] for j in result["items"]]
        assert_azure_error(rest.get(f"/jobs/v2/query?jobType=export&{API}"), 400, "ArgumentInvalid")
    finally:
        rest.post(f"/jobs/v2/{body['jobId']}/cancel?{API}")


# --- import / export ------------------------------------------------------------------------------------
_EXPORTS: dict[int, dict[str, Any]] = {}


def finished_export(hub: AzureHub, rest: httpx.Client) -> dict[str, Any]:
    """One export of the registry (keys excluded) per session, finished: {job, container, device}."""
    if id(hub) not in _EXPORTS:
        device_id, _, _ = create(rest)
        container = f"export-{_tag()}"
        uri = container_sas_uri(hub, container)
        r = rest.post(
            f"/jobs/create?{API}",
            json={"type": "export", "outputBlobContainerUri": uri, "excludeKeysInExport": True},
        )
        assert r.status_code == 200, r.text
        created = r.json()
        assert created["type"] == "export" and created["status"] in ("enqueued", "running", "completed")
        assert created["outputBlobContainerUri"] == uri.split("?")[0]  # the SAS is never echoed
        job = _finished(rest, f"/jobs/{created['jobId']}", 120)
        assert job["status"] == "completed", job
        _EXPORTS[id(hub)] = {"job": job, "container": container, "device": device_id}
    return _EXPORTS[id(hub)]


def probe_create_import_export_job(hub: AzureHub, rest: httpx.Client) -> None:
    export = finished_export(hub, rest)
    lines = [json.loads(line) for line in blob_bytes(hub, export["container"], "devices.txt").splitlines()]
    (mine,) = [e for e in lines if e["id"] == export["device"]]
    assert mine["authentication"]["symmetricKey"]["primaryKey"] is None  # excludeKeysInExport
    # import: a new device line from another container
    container, new_id = f"import-{_tag()}", f"imported-{_tag()}"
    uri = container_sas_uri(hub, container)
    line = {"id": new_id, "importMode": "create", "status": "disabled", "tags": {"from": "import"}}
    put_blob(hub, container, "devices.txt", json.dumps(line).encode() + b"\n")
    r = rest.post(
        f"/jobs/create?{API}",
        json={"type": "import", "inputBlobContainerUri": uri, "outputBlobContainerUri": uri},
    )
    assert r.status_code == 200 and r.json()["type"] == "import", r.text
    done = _finished(rest, f"/jobs/{r.json()['jobId']}", 120)
    assert done["status"] == "completed" and done["inputBlobContainerUri"] == uri.split("?")[0], done
    assert rest.get(f"/devices/{new_id}?{API}").json()["status"] == "disabled"
    assert rest.get(f"/twins/{new_id}?{API}").json()["tags"] == {"from": "import"}
    assert_azure_error(rest.post(f"/jobs/create?{API}", json={"type": "export"}), 400, "ArgumentInvalid")


def probe_get_import_export_jobs(hub: AzureHub, rest: httpx.Client) -> None:
    job = finished_export(hub, rest)["job"]
    r = rest.get(f"/jobs?{API}")
    assert r.status_code == 200 and isinstance(r.json(), list), r.text
    listed = {j["jobId"]: j for j in r.json()}
    assert (
        listed[job["jobId"]]["status"] == "completed"
        and "?" not in listed[job["jobId"]]["outputBlobContainerUri"]
    )


def probe_get_import_export_job(hub: AzureHub, rest: httpx.Client) -> None:
    job = finished_export(hub, rest)["job"]
    r = rest.get(f"/jobs/{job['jobId']}?{API}")
    assert r.status_code == 200 and r.json() == job
    assert job["progress"] == 100 and job["endTimeUtc"].endswith("Z") and job["statusMessage"]
    assert_azure_error(rest.get(f"/jobs/no-such-job?{API}"), 404, "JobNotFound")


def probe_cancel_import_export_job(hub: AzureHub, rest: httpx.Client) -> None:
    stall = StallingStorage(hub.root_ca.parent)
    try:
        r = rest.post(
            f"/jobs/create?{API}", json={"type": "export", "outputBlobContainerUri": stall.container_uri()}
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["jobId"]
        assert stall.arrived.wait(60), "the export never reached storage"
        assert rest.get(f"/jobs/{job_id}?{API}").json()["status"] == "running"
        cancelled = rest.delete(f"/jobs/{job_id}?{API}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        assert cancelled.json()["jobId"] == job_id and cancelled.json()["endTimeUtc"]
    finally:
        stall.close()
    assert rest.get(f"/jobs/{job_id}?{API}").json()["status"] == "cancelled"
    # a finished job is left as it is
    finished = finished_export(hub, rest)["job"]
    again = rest.delete(f"/jobs/{finished['jobId']}?{API}")
    assert again.status_code == 200 and again.json()["status"] == "completed"
    assert_azure_error(rest.delete(f"/jobs/no-such-job?{API}"), 404, "JobNotFound")


# --- configurations ------------------------------------------------------------------------------------
def configuration(tag: str, **extra: Any) -> dict[str, Any]:
    """A configuration for the devices tagged `tags.conf = tag` only."""
    return {
        "id": f"conf-{tag}",
        "priority": 1,
        "targetCondition": f"tags.conf = '{tag}'",
        "labels": {"by": "conformance"},
        "content": {"deviceContent": {"properties.desired.configured": {"by": tag}}},
        "metrics": {"queries": {"tagged": f"SELECT deviceId FROM devices WHERE tags.conf = '{tag}'"}},
        **extra,
    }


def _put_config(rest: httpx.Client, tag: str) -> dict[str, Any]:
    body = configuration(tag)
    r = rest.put(f"/configurations/{body['id']}?{API}", json=body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    assert r.headers["ETag"] == f'"{doc["etag"]}"'
    return doc


def _tagged_device(rest: httpx.Client, tag: str) -> str:
    device_id, _, _ = create(rest)
    assert rest.patch(f"/twins/{device_id}?{API}", json={"tags": {"conf": tag}}).status_code == 200
    return device_id


def probe_put_configuration(hub: AzureHub, rest: httpx.Client) -> None:
    tag = _tag()
    device_id = _tagged_device(rest, tag)
    doc = _put_config(rest, tag)
    assert doc["id"] == f"conf-{tag}" and doc["priority"] == 1 and doc["createdTimeUtc"].endswith("Z")
    assert doc["content"]["deviceContent"] == {"properties.desired.configured": {"by": tag}}
    path = f"/configurations/{doc['id']}?{API}"
    assert_azure_error(rest.put(path, json=configuration(tag)), 409, "ConfigurationAlreadyExists")
    updated = rest.put(path, json={**doc, "priority": 2}, headers={"If-Match": doc["etag"]})  # unquoted
    assert updated.status_code == 200 and updated.json()["priority"] == 2, updated.text
    assert updated.json()["etag"] != doc["etag"]
    stale = rest.put(path, json={**doc, "priority": 3}, headers={"If-Match": f'"{doc["etag"]}"'})
    assert_azure_error(stale, 412, "PreconditionFailed")
    changed = {**doc, "content": {"deviceContent": {"properties.desired.other": 1}}}
    assert_azure_error(rest.put(path, json=changed, headers={"If-Match": "*"}), 400, "ArgumentInvalid")
    try:  # the configuration reaches its device, and only its device
        wait_for(
            lambda: (
                rest.get(f"/twins/{device_id}?{API}").json()["properties"]["desired"].get("configured")
                == {"by": tag}
            ),
            "the configuration's content in the targeted twin",
        )
    finally:
        assert rest.delete(path, headers={"If-Match": "*"}).status_code == 204


def probe_get_configuration(hub: AzureHub, rest: httpx.Client) -> None:
    tag = _tag()
    _tagged_device(rest, tag)
    doc = _put_config(rest, tag)
    path = f"/configurations/{doc['id']}?{API}"
    try:

        def counted() -> dict[str, Any] | None:
            r = rest.get(path)
            assert r.status_code == 200 and r.headers["ETag"] == f'"{r.json()["etag"]}"', r.text
            body: dict[str, Any] = r.json()
            return body if body["systemMetrics"]["results"].get("appliedCount") == 1 else None

        got = wait_for(counted, "the configuration's metrics")
        assert got["systemMetrics"]["results"]["targetedCount"] == 1
        assert got["metrics"]["results"] == {"tagged": 1} and got["labels"] == {"by": "conformance"}
        assert_azure_error(rest.get(f"/configurations/no-{doc['id']}?{API}"), 404, "ConfigurationNotFound")
    finally:
        rest.delete(path, headers={"If-Match": "*"})


def probe_list_configurations(hub: AzureHub, rest: httpx.Client) -> None:
    docs = [_put_config(rest, _tag()) for _ in range(2)]
    try:
        r = rest.get(f"/configurations?{API}")
        assert r.status_code == 200 and isinstance(r.json(), list), r.text
        assert {d["id"] for d in docs} <= {c["id"] for c in r.json()}
        top = rest.get(f"/configurations?top=1&{API}")
        assert top.status_code == 200 and len(top.json()) == 1
        assert_azure_error(rest.get(f"/configurations?top=0&{API}"), 400, "ArgumentInvalid")
    finally:
        for doc in docs:
            rest.delete(f"/configurations/{doc['id']}?{API}", headers={"If-Match": "*"})


def probe_delete_configuration(hub: AzureHub, rest: httpx.Client) -> None:
    tag = _tag()
    device_id = _tagged_device(rest, tag)
    doc = _put_config(rest, tag)
    path = f"/configurations/{doc['id']}?{API}"

    def desired() -> dict[str, Any]:
        body: dict[str, Any] = rest.get(f"/twins/{device_id}?{API}").json()["properties"]["desired"]
        return body

    wait_for(lambda: "configured" in desired(), "the configuration's content in the twin")
    assert_azure_error(rest.delete(path, headers={"If-Match": '"stale"'}), 412, "PreconditionFailed")
    assert rest.delete(path, headers={"If-Match": f'"{doc["etag"]}"'}).status_code == 204
    assert_azure_error(rest.get(path), 404, "ConfigurationNotFound")
    wait_for(lambda: "configured" not in desired(), "the deleted configuration's settings removed")


def probe_test_queries(hub: AzureHub, rest: httpx.Client) -> None:
    good = rest.post(
        f"/configurations/testQueries?{API}",
        json={
            "targetCondition": "tags.site = 'a'",
            "customMetricQueries": {"m": "SELECT deviceId FROM devices"},
        },
    )
    assert good.status_code == 200 and good.json() == {
        "targetConditionError": "",
        "customMetricQueryErrors": {},
    }
    bad = rest.post(
        f"/configurations/testQueries?{API}",
        json={"targetCondition": "tags.site = ", "customMetricQueries": {"m": "SELEC x"}},
    ).json()
    assert bad["targetConditionError"] and bad["customMetricQueryErrors"]["m"]


def probe_apply_configuration(hub: AzureHub, rest: httpx.Client) -> None:
    device_id, _, _ = create(rest)
    assert rest.put(f"/devices/{device_id}/modules/edge?{API}", json={"moduleId": "edge"}).status_code == 200
    content = {
        "deviceContent": {"properties.desired.applied": 1},
        "modulesContent": {"edge": {"properties.desired": {"route": "on"}}},
    }
    r = rest.post(f"/devices/{device_id}/applyConfigurationContent?{API}", json=content)
    assert r.status_code == 204, r.text  # azure-iot-hub accepts only 204
    assert rest.get(f"/twins/{device_id}?{API}").json()["properties"]["desired"]["applied"] == 1
    assert rest.get(f"/twins/{device_id}/modules/edge?{API}").json()["properties"]["desired"]["route"] == "on"
    older = rest.post(
        f"/devices/applyConfigurationContent/{device_id}?{API}",
        json={"deviceContent": {"properties.desired.applied": 2}},
    )
    assert older.status_code == 204, older.text
    assert rest.get(f"/twins/{device_id}?{API}").json()["properties"]["desired"]["applied"] == 2
    missing = {"modulesContent": {"absent": {"properties.desired": {"x": 1}}}}
    r = rest.post(f"/devices/{device_id}/applyConfigurationContent?{API}", json=missing)
    assert_azure_error(r, 404, "ModuleNotFound")
    r = rest.post(f"/devices/no-{device_id}/applyConfigurationContent?{API}", json=content)
    assert_azure_error(r, 404, "DeviceNotFound")


# --- file upload ---------------------------------------------------------------------------------------
def _sas(hub: AzureHub, device: httpx.Client, device_id: str, name: str) -> dict[str, Any]:
    r = device.post(f"/devices/{device_id}/files?{API}", json={"blobName": name})
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()
    return info


def probe_file_upload_sas(hub: AzureHub, rest: httpx.Client) -> None:
    assert hub.azurite is not None
    device_id, key, _ = create(rest)
    other_id, _, _ = create(rest)
    with device_client(hub, device_id, key) as device:
        info = _sas(hub, device, device_id, "logs/a.txt")
        assert set(info) == {"correlationId", "hostName", "containerName", "blobName", "sasToken"}
        assert info["hostName"] == hub.azurite.account.host_name and info["containerName"] == UPLOADS
        assert info["blobName"] == f"{device_id}/logs/a.txt" and info["correlationId"]
        assert info["sasToken"].startswith("?") and "sr=b" in info["sasToken"]
        assert upload_with_sas(hub, info, b"conformance").status_code == 201  # storage takes it
        url = f"https://{info['hostName']}/{info['containerName']}/{info['blobName']}{info['sasToken']}"
        with httpx.Client(verify=str(hub.root_ca), timeout=60) as storage:
            assert storage.get(url).status_code == 403  # write only
        assert_azure_error(device.post(f"/devices/{device_id}/files?{API}", json={"blobName": "../x"}), 400)
        assert_azure_error(device.post(f"/devices/{other_id}/files?{API}", json={"blobName": "a"}), 401)
    with hub.rest() as anonymous:
        anonymous.headers.pop("Authorization")
        r = anonymous.post(f"/devices/{device_id}/files?{API}", json={"blobName": "a"})
        assert_azure_error(r, 401, "IotHubUnauthorizedAccess")


def probe_file_upload_notify(hub: AzureHub, rest: httpx.Client) -> None:
    assert hub.azurite is not None
    device_id, key, _ = create(rest)
    with device_client(hub, device_id, key) as device:
        # Python's form: the correlation id in the body
        info = _sas(hub, device, device_id, "py.bin")
        assert upload_with_sas(hub, info, b"x" * 100).status_code == 201
        done = device.post(
            f"/devices/{device_id}/files/notifications?{API}",
            json={
                "correlationId": info["correlationId"],
                "isSuccess": True,
                "statusCode": 201,
                "statusDescription": "",
            },
        )
        assert done.status_code == 204, done.text
        again = device.post(
            f"/devices/{device_id}/files/notifications?{API}",
            json={"correlationId": info["correlationId"], "isSuccess": True},
        )
        assert_azure_error(again, 404, "FileUploadNotFound")
        note, lock = take_notification(rest, info["blobName"], complete=False)
        assert note["deviceId"] == device_id and note["blobSizeInBytes"] == 100
        assert note["blobUri"] == f"{hub.azurite.account.endpoint}/{UPLOADS}/{info['blobName']}"
        assert note["enqueuedTimeUtc"].endswith("Z") and note["lastUpdatedTime"].endswith("Z")
        # the service's queue: abandon offers the batch again, complete removes it
        assert rest.post(f"/messages/serviceBound/filenotifications/{lock}/abandon?{API}").status_code == 204
        assert take_notification(rest, info["blobName"])[0] == note
        assert_azure_error(rest.delete(f"/messages/serviceBound/filenotifications/{lock}?{API}"), 412)
        # Node's form: the correlation id in the path; a failed upload queues no notification
        failed = _sas(hub, device, device_id, "failed.bin")
        r = device.post(
            f"/devices/{device_id}/files/notifications/{failed['correlationId']}?{API}",
            json={"isSuccess": False, "statusCode": 500, "statusDescription": "gave up"},
        )
        assert r.status_code == 204, r.text
        node = _sas(hub, device, device_id, "node.bin")
        assert upload_with_sas(hub, node, b"node").status_code == 201
        r = device.post(
            f"/devices/{device_id}/files/notifications/{node['correlationId']}?{API}",
            json={"isSuccess": True, "statusCode": 201, "statusDescription": ""},
        )
        assert r.status_code == 204, r.text
        assert take_notification(rest, node["blobName"])[0]["blobSizeInBytes"] == 4


FLEET_PROBES: dict[str, Callable[[AzureHub, httpx.Client], None]] = {
    "Jobs_CreateScheduledJob": probe_create_scheduled_job,
    "Jobs_GetScheduledJob": probe_get_scheduled_job,
    "Jobs_CancelScheduledJob": probe_cancel_scheduled_job,
    "Jobs_QueryScheduledJobs": probe_query_scheduled_jobs,
    "Jobs_CreateImportExportJob": probe_create_import_export_job,
    "Jobs_GetImportExportJobs": probe_get_import_export_jobs,
    "Jobs_GetImportExportJob": probe_get_import_export_job,
    "Jobs_CancelImportExportJob": probe_cancel_import_export_job,
    "Configuration_CreateOrUpdate": probe_put_configuration,
    "Configuration_Get": probe_get_configuration,
    "Configuration_GetConfigurations": probe_list_configurations,
    "Configuration_Delete": probe_delete_configuration,
    "Configuration_TestQueries": probe_test_queries,
    "Configuration_ApplyOnEdgeDevice": probe_apply_configuration,
    "Device_CreateFileUploadSasUri": probe_file_upload_sas,
    "Device_UpdateFileUploadStatus": probe_file_upload_notify,
}
