"""Import and export of the device registry through blob storage, in Azure's format: a block blob
(`devices.txt` unless the job names another) with one ExportImportDevice JSON object per line
(`id, eTag, status, statusReason, authentication, twinETag, tags, properties{desired, reported},
capabilities, importMode`). Export writes every device and its twin (keys `null` with
`excludeKeysInExport`); import applies each line's `importMode` (default `createOrUpdate`) and writes
the lines it could not apply to `importErrors.log` in the output container, one JSON object each.

Both run against the caller's container SAS URIs only (`storage.blob.ContainerUri`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from tether.errors import BadRequest, TetherError
from tether.messaging.twin_docs import without_reserved
from tether.messaging.twins import TwinService
from tether.registry.models import Device
from tether.registry.service import MAX_BULK, BulkOperation, RegistryService
from tether.storage.blob import ContainerUri

__all__ = ["DEVICES_BLOB", "ERRORS_BLOB", "export_registry", "import_registry"]

log = logging.getLogger("tether.jobs")

DEVICES_BLOB: Final = "devices.txt"
ERRORS_BLOB: Final = "importErrors.log"
MAX_IMPORT_BYTES: Final = 256 * 1024 * 1024
_DEVICE_FIELDS = ("status", "statusReason", "authentication", "capabilities", "deviceScope", "parentScopes")
_MODES = {
    m.lower(): m
    for m in (
        "create",
        "update",
        "updateIfMatchETag",
        "delete",
        "deleteIfMatchETag",
        "createOrUpdate",
        "createOrUpdateIfMatchETag",
        "updateTwin",
        "updateTwinIfMatchETag",
    )
}
Progress = Callable[[int], Awaitable[None]]


def _export_line(device: Device, twin: dict[str, Any], exclude_keys: bool) -> dict[str, Any]:
    wire = device.to_wire()
    auth = wire.get("authentication") or {}
    if exclude_keys and isinstance(auth.get("symmetricKey"), dict):
        auth["symmetricKey"] = {"primaryKey": None, "secondaryKey": None}
    props = twin.get("properties", {})
    return {
        "id": device.device_id,
        "eTag": device.etag,
        "status": wire.get("status"),
        "statusReason": wire.get("statusReason"),
        "authentication": auth,
        "twinETag": twin.get("etag"),
        "tags": twin.get("tags") or {},
        "properties": {
            "desired": without_reserved(props.get("desired", {})),
            "reported": without_reserved(props.get("reported", {})),
        },
        "capabilities": wire.get("capabilities"),
    }


async def export_registry(
    registry: RegistryService,
    twins: TwinService,
    output: ContainerUri,
    *,
    blob_name: str | None,
    exclude_keys: bool,
    progress: Progress,
) -> int:
    """Write every device to `output/{blob_name or devices.txt}`; returns how many."""
    lines: list[bytes] = []
    async for device in registry.export_devices():
        try:
            twin = await twins.get(device.device_id)
        except TetherError:  # deleted meanwhile
            continue
        lines.append(json.dumps(_export_line(device, twin, exclude_keys), separators=(",", ":")).encode())
        if len(lines) % 1000 == 0:
            await progress(len(lines))
    await output.upload(blob_name or DEVICES_BLOB, b"\n".join(lines) + (b"\n" if lines else b""))
    return len(lines)


async def _read_lines(source: ContainerUri, blob: str) -> list[tuple[int, Any]]:
    data = bytearray()
    async for chunk in source.download(blob):
        data.extend(chunk)
        if len(data) > MAX_IMPORT_BYTES:
            raise BadRequest(f"{blob} is larger than {MAX_IMPORT_BYTES} bytes", field="inputBlobName")
    out: list[tuple[int, Any]] = []
    for number, raw in enumerate(bytes(data).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            out.append((number, json.loads(raw)))
        except ValueError:
            out.append((number, None))
    return out


def _operation(entry: dict[str, Any]) -> tuple[str, BulkOperation | None, dict[str, Any] | None]:
    """(mode, registry operation or None, twin patch or None) of one ExportImportDevice line."""
    device_id = entry.get("id")
    if not isinstance(device_id, str):
        raise BadRequest("id is required", field="id")
    raw_mode = entry.get("importMode") or "createOrUpdate"
    mode = _MODES.get(str(raw_mode).lower())
    if mode is None:
        raise BadRequest(
            f"importMode {raw_mode!r} is not supported", code="InvalidOperation", field="importMode"
        )
    twin: dict[str, Any] = {}
    if isinstance(entry.get("tags"), dict) and entry["tags"]:
        twin["tags"] = entry["tags"]
    desired = (
        (entry.get("properties") or {}).get("desired") if isinstance(entry.get("properties"), dict) else None
    )
    if isinstance(desired, dict) and without_reserved(desired):
        twin["properties"] = {"desired": without_reserved(desired)}
    if mode.startswith("updateTwin"):
        return mode, None, twin or None
    registry_mode = {"createOrUpdate": "update", "createOrUpdateIfMatchETag": "updateIfMatchETag"}.get(
        mode, mode
    )
    body = {k: entry[k] for k in _DEVICE_FIELDS if entry.get(k) is not None}
    auth = body.get("authentication")
    if isinstance(auth, dict) and isinstance(auth.get("symmetricKey"), dict):
        keys = {k: v for k, v in auth["symmetricKey"].items() if v}
        body["authentication"] = {**auth, "symmetricKey": keys}
    operation = BulkOperation(device_id, registry_mode, body, entry.get("eTag"))
    return mode, operation, (None if mode.startswith("delete") else twin or None)


async def import_registry(
    registry: RegistryService,
    twins: TwinService,
    source: ContainerUri,
    output: ContainerUri,
    *,
    blob_name: str | None,
    actor: str,
    progress: Progress,
) -> tuple[int, int]:
    """Apply `source/{blob_name or devices.txt}`; returns (applied, failed)."""
    errors: list[dict[str, Any]] = []
    applied = 0
    pending: list[tuple[int, str, BulkOperation | None, dict[str, Any] | None]] = []

    def fail(line: int, device_id: Any, code: str, message: str) -> None:
        errors.append(
            {
                "line": line,
                "deviceId": device_id if isinstance(device_id, str) else None,
                "errorCode": code,
                "errorStatus": message,
            }
        )

    async def flush() -> None:
        nonlocal applied
        ops = [op for _, _, op, _ in pending if op is not None]
        batch_errors = await registry.bulk(ops, actor=actor) if ops else []
        if batch_errors:  # all or nothing refused: apply one by one to find the failures
            for line, _, op, twin in pending:
                if op is not None:
                    single = await registry.bulk([op], actor=actor)
                    if single:
                        fail(line, op.device_id, single[0].code, single[0].message)
                        continue
                applied += await _apply_twin(line, op, twin)
        else:
            for line, _, op, twin in pending:
                applied += await _apply_twin(line, op, twin)
        pending.clear()
        await progress(applied + len(errors))

    async def _apply_twin(line: int, op: BulkOperation | None, twin: dict[str, Any] | None) -> int:
        if twin is None:
            return 1
        device_id = op.device_id if op is not None else twin.get("_id")
        try:
            await twins.patch(
                str(device_id), {k: v for k, v in twin.items() if k != "_id"}, if_match=None, actor=actor
            )
        except TetherError as exc:
            fail(line, device_id, exc.code, exc.message)
            return 0
        return 1

    for line, entry in await _read_lines(source, blob_name or DEVICES_BLOB):
        if not isinstance(entry, dict):
            fail(line, None, "ArgumentInvalid", "line is not a JSON object")
            continue
        try:
            mode, op, twin = _operation(entry)
        except TetherError as exc:
            fail(line, entry.get("id"), exc.code, exc.message)
            continue
        if op is None and twin is not None:
            twin = {**twin, "_id": entry["id"]}
        if op is not None and any(p[2] is not None and p[2].device_id == op.device_id for p in pending):
            await flush()
        pending.append((line, mode, op, twin))
        if len(pending) >= MAX_BULK:
            await flush()
    if pending:
        await flush()
    if errors:
        await output.upload(ERRORS_BLOB, b"\n".join(json.dumps(e).encode() for e in errors) + b"\n")
    return applied, len(errors)
