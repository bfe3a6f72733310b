"""Jobs' wire shapes: parsing Azure's JobRequest (`PUT /jobs/v2/{id}`) and JobProperties
(`POST /jobs/create`), and rendering JobResponse, JobProperties and `devices.jobs` rows.

Stored as a `JobRecord` whose `doc` holds the request fields as Azure names them plus the
hub's own (`failureReason`, `statusMessage`, `progress`, `deviceCount`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

from tether.errors import BadRequest
from tether.messaging.methods import RESPONSE_TIMEOUT_RANGE, encode_payload, validate_method_name
from tether.storage.sql.jobs import DeviceJobRecord, JobRecord

__all__ = [
    "DEVICE_TYPES",
    "REGISTRY_TYPES",
    "device_job_row",
    "iso_ms",
    "parse_device_job",
    "parse_registry_job",
    "parse_time",
    "render_job_response",
    "render_registry_job",
    "validate_job_id",
]

DEVICE_TYPES: Final = ("scheduleUpdateTwin", "scheduleDeviceMethod")
REGISTRY_TYPES: Final = ("export", "import")
JOB_STATUSES: Final = (
    "unknown",
    "enqueued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "scheduled",
    "queued",
)
MAX_EXECUTION_S: Final = 7 * 24 * 3600
DEFAULT_EXECUTION_S: Final = 3600
_JOB_ID = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise BadRequest("jobId must be 1-128 letters, digits or -.%_*?!(),:=@$'", field="jobId")
    return job_id


def iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object, field: str) -> int | None:
    """ISO 8601 (a `Z` or offset; naive means UTC) → epoch ms; None/"" → None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be an ISO 8601 date-time", field=field)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{field} must be an ISO 8601 date-time", field=field) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _int(value: object, field: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{field} must be an integer between {low} and {high}", field=field)
    return value


def parse_device_job(job_id: str, body: dict[str, Any], now_ms: int) -> tuple[str, int, dict[str, Any]]:
    """(type, start ms, document) of a JobRequest; 400 naming the field for anything malformed."""
    given = body.get("jobId")
    if given not in (None, "", job_id):
        raise BadRequest(f"jobId {given!r} in the body does not match {job_id!r}", field="jobId")
    job_type = body.get("type")
    if job_type not in DEVICE_TYPES:
        raise BadRequest(f"type must be one of {', '.join(DEVICE_TYPES)}", field="type")
    condition = body.get("queryCondition")
    if not isinstance(condition, str) or not condition.strip():
        raise BadRequest(
            "queryCondition is required (a WHERE clause, or * for every device)", field="queryCondition"
        )
    from tether.messaging.jobs.targets import parse_condition

    parse_condition(condition)  # 400 now rather than a failed job later
    start_ms = parse_time(body.get("startTime"), "startTime") or now_ms
    max_s = _int(
        body.get("maxExecutionTimeInSeconds"),
        "maxExecutionTimeInSeconds",
        1,
        MAX_EXECUTION_S,
        DEFAULT_EXECUTION_S,
    )
    doc: dict[str, Any] = {"queryCondition": condition, "maxExecutionTimeInSeconds": max_s}
    if job_type == "scheduleDeviceMethod":
        method = body.get("cloudToDeviceMethod")
        if not isinstance(method, dict):
            raise BadRequest(
                "cloudToDeviceMethod is required for scheduleDeviceMethod", field="cloudToDeviceMethod"
            )
        name = validate_method_name(method.get("methodName"))
        encode_payload(method.get("payload"))  # ≤ 128 KB, JSON
        doc["cloudToDeviceMethod"] = {
            "methodName": name,
            "payload": method.get("payload"),
            "responseTimeoutInSeconds": _int(
                method.get("responseTimeoutInSeconds"),
                "cloudToDeviceMethod.responseTimeoutInSeconds",
                *RESPONSE_TIMEOUT_RANGE,
                30,
            ),
            "connectTimeoutInSeconds": _int(
                method.get("connectTimeoutInSeconds"),
                "cloudToDeviceMethod.connectTimeoutInSeconds",
                0,
                300,
                0,
            ),
        }
    else:
        twin = body.get("updateTwin")
        if not isinstance(twin, dict) or not (twin.get("tags") or twin.get("properties")):
            raise BadRequest(
                "updateTwin with tags and/or properties.desired is required for scheduleUpdateTwin",
                field="updateTwin",
            )
        doc["updateTwin"] = {k: v for k, v in twin.items() if k in ("tags", "properties", "etag")}
    return str(job_type), start_ms, doc


def _statistics(stats: dict[str, int]) -> dict[str, int]:
    return {
        "deviceCount": sum(stats.values()),
        "failedCount": stats.get("failed", 0) + stats.get("canceled", 0),
        "succeededCount": stats.get("completed", 0),
        "runningCount": stats.get("running", 0),
        "pendingCount": stats.get("pending", 0) + stats.get("scheduled", 0),
    }


def render_job_response(job: JobRecord, stats: dict[str, int]) -> dict[str, Any]:
    doc = job.doc
    out: dict[str, Any] = {
        "jobId": job.job_id,
        "queryCondition": doc.get("queryCondition"),
        "createdTime": iso_ms(job.created_ms),
        "startTime": iso_ms(job.start_ms),
        "endTime": iso_ms(job.end_ms),
        "maxExecutionTimeInSeconds": doc.get("maxExecutionTimeInSeconds"),
        "type": job.type,
        "status": job.status,
        "deviceJobStatistics": _statistics(stats),
    }
    for key in ("cloudToDeviceMethod", "updateTwin", "failureReason", "statusMessage"):
        if doc.get(key) is not None:
            out[key] = doc[key]
    return out


def device_job_row(record: DeviceJobRecord, job_type: str) -> dict[str, Any]:
    """One `devices.jobs` row (Azure's field names)."""
    row: dict[str, Any] = {
        "deviceId": record.device_id,
        "jobId": record.job_id,
        "jobType": job_type,
        "status": record.status,
        "startTimeUtc": iso_ms(record.start_ms),
        "endTimeUtc": iso_ms(record.end_ms),
        "createdDateTimeUtc": iso_ms(record.created_ms),
        "lastUpdatedDateTimeUtc": iso_ms(record.updated_ms),
    }
    if record.outcome is not None:
        row["outcome"] = record.outcome
    if record.error is not None:
        row["error"] = record.error
    return row


def parse_registry_job(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(type, document) of an import/export JobProperties."""
    job_type = str(body.get("type") or "").lower()
    if job_type not in REGISTRY_TYPES:
        raise BadRequest("type must be export or import", field="type")
    auth = body.get("storageAuthenticationType")
    if auth is not None and str(auth).lower() != "keybased":
        raise BadRequest(
            "storageAuthenticationType identityBased is not supported: give container SAS URIs",
            code="NotSupported",
            field="storageAuthenticationType",
        )
    doc: dict[str, Any] = {"excludeKeysInExport": bool(body.get("excludeKeysInExport", False))}
    for key in ("inputBlobContainerUri", "outputBlobContainerUri", "inputBlobName", "outputBlobName"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{key} must be a string", field=key)
        if value:
            doc[key] = value
    if "outputBlobContainerUri" not in doc:
        raise BadRequest("outputBlobContainerUri is required", field="outputBlobContainerUri")
    if job_type == "import" and "inputBlobContainerUri" not in doc:
        raise BadRequest("inputBlobContainerUri is required for an import", field="inputBlobContainerUri")
    return job_type, doc


def _redact(uri: str | None) -> str | None:
    return None if uri is None else uri.split("?", 1)[0]


def render_registry_job(job: JobRecord) -> dict[str, Any]:
    doc = job.doc
    out: dict[str, Any] = {
        "jobId": job.job_id,
        "type": job.type,
        "status": job.status,
        "progress": doc.get("progress", 0),
        "startTimeUtc": iso_ms(job.start_ms),
        "endTimeUtc": iso_ms(job.end_ms),
        "excludeKeysInExport": doc.get("excludeKeysInExport", False),
        "storageAuthenticationType": "keyBased",
        "outputBlobContainerUri": _redact(doc.get("outputBlobContainerUri")),
    }
    if doc.get("inputBlobContainerUri"):
        out["inputBlobContainerUri"] = _redact(doc.get("inputBlobContainerUri"))
    for key in ("inputBlobName", "outputBlobName", "failureReason", "statusMessage"):
        if doc.get(key):
            out[key] = doc[key]
    return out
