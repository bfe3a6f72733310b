"""The calls of `IoTHubJobManager` and `IoTHubConfigurationManager` (azure-iot-hub) for
`test_sdk_methods.py`, against the shared hub and its Azurite: each SDK method called as an application
calls it, its answer deserialised by the SDK and checked, and its effect on the hub checked.

Like the REST probes (fleet_probes.py), every job and configuration targets only its own devices."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    ConfigurationQueriesTestInput,
    JobProperties,
    JobRequest,
    Twin,
    TwinProperties,
)
from conformance_kit import Service, new_key, wait_for
from msrest.exceptions import HttpOperationError
from storage_kit import StallingStorage, blob_bytes, container_sas_uri

FINISHED = ("completed", "failed", "cancelled")


def _twin_job(job_id: str, devices: list[str], tag: str, start_time: str | None = None) -> JobRequest:
    ids = ", ".join(f"'{d}'" for d in devices)
    return JobRequest(
        job_id=job_id,
        type="scheduleUpdateTwin",
        query_condition=f"deviceId IN [{ids}]",
        start_time=start_time,
        max_execution_time_in_seconds=300,
        update_twin=Twin(etag="*", properties=TwinProperties(desired={"sdkjob": tag})),
    )


def _later() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))


def _status(error: pytest.ExceptionInfo[HttpOperationError]) -> tuple[int, str]:
    response = error.value.response
    return response.status_code, response.headers["iothub-errorcode"]


# --- scheduled jobs ----------------------------------------------------------------------------------------
def scheduled_job(s: Service) -> None:
    """create_scheduled_job, then get_scheduled_job until it is done."""
    devices = [s.device(), s.device()]
    tag = uuid.uuid4().hex[:10]
    job_id = f"sdk-job-{tag}"
    created = s.jobs.create_scheduled_job(job_id, _twin_job(job_id, devices, tag))
    assert created.job_id == job_id and created.type == "scheduleUpdateTwin"
    assert created.status in ("queued", "running", "completed") and created.created_time
    done = wait_for(lambda: (j := s.jobs.get_scheduled_job(job_id)).status in FINISHED and j, f"job {job_id}")
    assert done.status == "completed" and done.end_time
    stats = done.device_job_statistics
    assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (2, 2, 0)
    assert all(s.registry.get_twin(d).properties.desired["sdkjob"] == tag for d in devices)
    with pytest.raises(HttpOperationError) as again:
        s.jobs.create_scheduled_job(job_id, _twin_job(job_id, devices, tag))
    assert _status(again) == (409, "JobAlreadyExists")
    with pytest.raises(HttpOperationError) as missing:
        s.jobs.get_scheduled_job(f"no-{job_id}")
    assert _status(missing) == (404, "JobNotFound")


def cancel_scheduled_job(s: Service) -> None:
    device_id = s.device()
    job_id = f"sdk-later-{uuid.uuid4().hex[:10]}"
    created = s.jobs.create_scheduled_job(job_id, _twin_job(job_id, [device_id], "x", _later()))
    assert created.status == "scheduled"
    cancelled = s.jobs.cancel_scheduled_job(job_id)
    assert cancelled.job_id == job_id and cancelled.status == "cancelled"
    assert s.jobs.get_scheduled_job(job_id).status == "cancelled"
    assert "sdkjob" not in s.registry.get_twin(device_id).properties.desired


def query_scheduled_jobs(s: Service) -> None:
    job_id = f"sdk-query-{uuid.uuid4().hex[:10]}"
    s.jobs.create_scheduled_job(job_id, _twin_job(job_id, [s.device()], "q", _later()))
    try:
        result = s.jobs.query_scheduled_jobs("scheduleUpdateTwin", "scheduled")  # a QueryResult object
        assert result.type == "jobResponse" and result.continuation_token is None
        assert job_id in [j["jobId"] for j in result.items]
        assert {j["status"] for j in result.items} == {"scheduled"}
    finally:
        s.jobs.cancel_scheduled_job(job_id)
    cancelled = s.jobs.query_scheduled_jobs("scheduleUpdateTwin", "cancelled")
    assert job_id in [j["jobId"] for j in cancelled.items]


# --- import / export ---------------------------------------------------------------------------------------
def export_job(s: Service) -> None:
    """create_import_export_job (an export to Azurite), get_import_export_job until it is done,
    get_import_export_jobs; the blob has the device with its keys."""
    device_id = s.device()
    key = s.registry.get_device(device_id).authentication.symmetric_key.primary_key
    container = f"sdk-export-{uuid.uuid4().hex[:10]}"
    uri = container_sas_uri(s.hub, container)
    created = s.jobs.create_import_export_job(
        JobProperties(type="export", output_blob_container_uri=uri, exclude_keys_in_export=False)
    )
    assert created.type == "export" and created.status in ("enqueued", "running", "completed")
    done = wait_for(
        lambda: (j := s.jobs.get_import_export_job(created.job_id)).status in FINISHED and j,
        f"export {created.job_id}",
        timeout=120,
    )
    assert done.status == "completed" and done.progress == 100, done.failure_reason
    assert done.output_blob_container_uri == uri.split("?")[0]  # the SAS is never echoed
    assert created.job_id in {j.job_id for j in s.jobs.get_import_export_jobs()}
    lines = blob_bytes(s.hub, container, "devices.txt").decode().splitlines()
    assert any(f'"id":"{device_id}"' in line and key in line for line in lines)
    with pytest.raises(HttpOperationError) as missing:
        s.jobs.get_import_export_job("no-such-job")
    assert _status(missing) == (404, "JobNotFound")


def cancel_export_job(s: Service) -> None:
    """cancel_import_export_job on an export that is running (its storage stalls until released)."""
    stall = StallingStorage(s.hub.root_ca.parent)
    try:
        created = s.jobs.create_import_export_job(
            JobProperties(type="export", output_blob_container_uri=stall.container_uri())
        )
        assert stall.arrived.wait(60), "the export never reached storage"
        cancelled = s.jobs.cancel_import_export_job(created.job_id)  # msrest: a plain object (dict)
        assert cancelled["jobId"] == created.job_id and cancelled["status"] == "cancelled"
    finally:
        stall.close()
    assert s.jobs.get_import_export_job(created.job_id).status == "cancelled"


# --- configurations ----------------------------------------------------------------------------------------
def configurations(s: Service) -> None:
    """create, get, update, list and delete a configuration; its content reaches its device's twin and
    is removed with it."""
    tag = uuid.uuid4().hex[:10]
    device_id = s.device()
    s.registry.update_twin(device_id, Twin(tags={"conf": tag}), "*")
    config = Configuration(
        id=f"sdk-conf-{tag}",
        priority=1,
        target_condition=f"tags.conf = '{tag}'",
        labels={"by": "sdk"},
        content=ConfigurationContent(device_content={"properties.desired.sdkconf": {"by": tag}}),
        metrics=ConfigurationMetrics(
            queries={"tagged": f"SELECT deviceId FROM devices WHERE tags.conf = '{tag}'"}
        ),
    )
    created = s.configs.create_configuration(config)
    assert created.id == config.id and created.etag and created.created_time_utc
    got = s.configs.get_configuration(config.id)
    assert got.etag == created.etag and got.content.device_content == config.content.device_content
    with pytest.raises(HttpOperationError) as again:
        s.configs.create_configuration(config)
    assert _status(again) == (409, "ConfigurationAlreadyExists")
    created.priority = 5
    updated = s.configs.update_configuration(created, created.etag)  # the SDK sends the etag unquoted
    assert updated.priority == 5 and updated.etag != created.etag
    with pytest.raises(HttpOperationError) as stale:
        s.configs.update_configuration(created, created.etag)
    assert _status(stale) == (412, "PreconditionFailed")
    assert config.id in [c.id for c in s.configs.get_configurations()]
    assert len(s.configs.get_configurations(1)) == 1

    def desired() -> dict[str, Any]:
        properties: dict[str, Any] = s.registry.get_twin(device_id).properties.desired
        return properties

    wait_for(lambda: desired().get("sdkconf") == {"by": tag}, "the configuration's content in the twin")
    s.configs.delete_configuration(config.id)  # If-Match: *
    with pytest.raises(HttpOperationError) as gone:
        s.configs.get_configuration(config.id)
    assert _status(gone) == (404, "ConfigurationNotFound")
    wait_for(lambda: "sdkconf" not in desired(), "the deleted configuration's settings removed")


def configuration_queries(s: Service) -> None:
    good = s.configs.test_configuration_queries(
        ConfigurationQueriesTestInput(
            target_condition="tags.site = 'a'", custom_metric_queries={"m": "SELECT deviceId FROM devices"}
        )
    )
    assert good.target_condition_error == "" and good.custom_metric_query_errors == {}
    bad = s.configs.test_configuration_queries(
        ConfigurationQueriesTestInput(target_condition="tags.site =", custom_metric_queries={"m": "SELEC"})
    )
    assert bad.target_condition_error and bad.custom_metric_query_errors["m"]


def apply_on_edge_device(s: Service) -> None:
    device_id = s.device()
    s.registry.create_module_with_sas(device_id, "edge", None, new_key(), new_key())
    content = ConfigurationContent(
        device_content={"properties.desired.applied": 1},
        modules_content={"edge": {"properties.desired": {"route": "on"}}},
    )
    s.configs.apply_configuration_on_edge_device(device_id, content)  # the SDK accepts only 204
    assert s.registry.get_twin(device_id).properties.desired["applied"] == 1
    assert s.registry.get_module_twin(device_id, "edge").properties.desired["route"] == "on"
    with pytest.raises(HttpOperationError) as missing:
        s.configs.apply_configuration_on_edge_device(f"no-{device_id}", content)
    assert _status(missing) == (404, "DeviceNotFound")


JOBS = "IoTHubJobManager"
CONFIGS = "IoTHubConfigurationManager"
FLEET_CALLS: dict[str, Callable[[Service], Any]] = {
    f"{JOBS}.create_scheduled_job": scheduled_job,
    f"{JOBS}.get_scheduled_job": scheduled_job,
    f"{JOBS}.cancel_scheduled_job": cancel_scheduled_job,
    f"{JOBS}.query_scheduled_jobs": query_scheduled_jobs,
    f"{JOBS}.create_import_export_job": export_job,
    f"{JOBS}.get_import_export_job": export_job,
    f"{JOBS}.get_import_export_jobs": export_job,
    f"{JOBS}.cancel_import_export_job": cancel_export_job,
    **{
        f"{CONFIGS}.{name}": configurations
        for name in (
            "create_configuration",
            "get_configuration",
            "update_configuration",
            "get_configurations",
            "delete_configuration",
        )
    },
    f"{CONFIGS}.test_configuration_queries": configuration_queries,
    f"{CONFIGS}.apply_configuration_on_edge_device": apply_on_edge_device,
}
