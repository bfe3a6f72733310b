"""Import and export of the device registry through blob storage, in Azure's format: a block blob
(`devices.txt` unless the job names another) with one ExportImportDevice JSON object per line
(`id, moduleId, eTag, status, statusReason, authentication, twinETag, tags, properties{desired,
reported}, capabilities, importMode`). Export writes every device and its twin, then every module
identity and its module twin (`moduleId` set; `status` is always `enabled`, a module has none of its
own), keys `null` with `excludeKeysInExport`. Import applies each line's `importMode` (default
`createOrUpdate`) to the device, or with `moduleId` to that module of it (identity through
`ModuleService`, tags and desired properties to the module twin), and writes the lines it could not
apply to `importErrors.log` in the output container, one JSON object each.

Both run against the caller's container SAS URIs only (`storage.blob.ContainerUri`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from tether.errors import BadRequest, NotFound, TetherError
from tether.messaging.twin_docs import without_reserved
from tether.messaging.twins import TwinService
from tether.registry.models import Device, Module
from tether.registry.modules import ModuleService
from tether.registry.service import MAX_BULK, BulkOperation, RegistryService
from tether.storage.blob import ContainerUri

__all__ = ["DEVICES_BLOB", "ERRORS_BLOB", "export_registry", "import_registry"]

log = logging.getLogger("tether.jobs")

DEVICES_BLOB: Final = "devices.txt"
ERRORS_BLOB: Final = "importErrors.log"
MAX_IMPORT_BYTES: Final = 256 * 1024 * 1024
_MODULE_PAGE: Final = 500
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


def _authentication(wire: dict[str, Any], exclude_keys: bool) -> dict[str, Any]:
    auth: dict[str, Any] = wire.get("authentication") or {}
    if exclude_keys and isinstance(auth.get("symmetricKey"), dict):
        auth["symmetricKey"] = {"primaryKey": None, "secondaryKey": None}
    return auth


def _twin_fields(twin: dict[str, Any]) -> dict[str, Any]:
    props = twin.get("properties", {})
    return {
        "twinETag": twin.get("etag"),
        "tags": twin.get("tags") or {},
        "properties": {
            "desired": without_reserved(props.get("desired", {})),
            "reported": without_reserved(props.get("reported", {})),
        },
    }


def _export_line(device: Device, twin: dict[str, Any], exclude_keys: bool) -> dict[str, Any]:
    wire = device.to_wire()
    return {
        "id": device.device_id,
        "eTag": device.etag,
        "status": wire.get("status"),
        "statusReason": wire.get("statusReason"),
        "authentication": _authentication(wire, exclude_keys),
        **_twin_fields(twin),
        "capabilities": wire.get("capabilities"),
    }


def _export_module_line(module: Module, twin: dict[str, Any], exclude_keys: bool) -> dict[str, Any]:
    return {
        "id": module.device_id,
        "moduleId": module.module_id,
        "eTag": module.etag,
        "status": "enabled",
        "authentication": _authentication(module.to_wire(), exclude_keys),
        **_twin_fields(twin),
    }


async def export_registry(
    registry: RegistryService,
    modules: ModuleService,
    twins: TwinService,
    output: ContainerUri,
    *,
    blob_name: str | None,
    exclude_keys: bool,
    progress: Progress,
) -> tuple[int, int]:
    """Write every device, then every module, to `output/{blob_name or devices.txt}`; returns how many
    of each."""
    lines: list[bytes] = []

    def add(line: dict[str, Any]) -> None:
        lines.append(json.dumps(line, separators=(",", ":")).encode())

    async for device in registry.export_devices():
        try:
            twin = await twins.get(device.device_id)
        except TetherError:  # deleted meanwhile
            continue
        add(_export_line(device, twin, exclude_keys))
        if len(lines) % 1000 == 0:
            await progress(len(lines))
    device_count = len(lines)
    after: tuple[str, str] | None = None
    while True:
        page = await modules.scan(after=after, limit=_MODULE_PAGE)
        module_twins = {(t["deviceId"], t["moduleId"]): t
                        for t in await twins.scan_modules(after=after, limit=_MODULE_PAGE)}
        for module in page:
            module_twin = module_twins.get(module.key)
            if module_twin is None:  # created between the two reads
                try:
                    module_twin = await twins.get(module.device_id, module.module_id)
                except TetherError:  # deleted meanwhile
                    continue
            add(_export_module_line(module, module_twin, exclude_keys))
        await progress(len(lines))
        if len(page) < _MODULE_PAGE:
            break
        after = page[-1].key
    await output.upload(blob_name or DEVICES_BLOB, b"\n".join(lines) + (b"\n" if lines else b""))
    return device_count, len(lines) - device_count


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


def _mode(entry: dict[str, Any]) -> str:
    if not isinstance(entry.get("id"), str):
        raise BadRequest("id is required", field="id")
    raw_mode = entry.get("importMode") or "createOrUpdate"
    mode = _MODES.get(str(raw_mode).lower())
    if mode is None:
        raise BadRequest(
            f"importMode {raw_mode!r} is not supported", code="InvalidOperation", field="importMode"
        )
    return mode


def _twin_patch(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The line's tags and desired properties as a twin PATCH body (None: neither)."""
    twin: dict[str, Any] = {}
    if isinstance(entry.get("tags"), dict) and entry["tags"]:
        twin["tags"] = entry["tags"]
    desired = (
        (entry.get("properties") or {}).get("desired") if isinstance(entry.get("properties"), dict) else None
    )
    if isinstance(desired, dict) and without_reserved(desired):
        twin["properties"] = {"desired": without_reserved(desired)}
    return twin or None


def _identity_body(entry: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """The registry body of a line: its given fields, empty keys left for the hub to generate."""
    body = {k: entry[k] for k in fields if entry.get(k) is not None}
    auth = body.get("authentication")
    if isinstance(auth, dict) and isinstance(auth.get("symmetricKey"), dict):
        keys = {k: v for k, v in auth["symmetricKey"].items() if v}
        body["authentication"] = {**auth, "symmetricKey": keys}
    return body


def _operation(entry: dict[str, Any]) -> tuple[str, BulkOperation | None, dict[str, Any] | None]:
    """(mode, registry operation or None, twin patch or None) of one device line."""
    mode = _mode(entry)
    twin = _twin_patch(entry)
    if mode.startswith("updateTwin"):
        return mode, None, twin
    registry_mode = {"createOrUpdate": "update", "createOrUpdateIfMatchETag": "updateIfMatchETag"}.get(
        mode, mode
    )
    body = _identity_body(entry, _DEVICE_FIELDS)
    operation = BulkOperation(entry["id"], registry_mode, body, entry.get("eTag"))
    return mode, operation, (None if mode.startswith("delete") else twin)


async def _apply_module_line(modules: ModuleService, twins: TwinService, entry: dict[str, Any],
                             actor: str) -> None:
    """One module line: its identity (create, replace or delete; the IfMatchETag modes compare the
    module's etag), then its tags and desired properties to the module twin."""
    mode = _mode(entry)
    device_id, module_id = entry["id"], entry["moduleId"]
    etag = entry.get("eTag") if mode.endswith("IfMatchETag") else None
    if mode.startswith("delete"):
        await modules.delete(device_id, module_id, if_match=etag, actor=actor)
        return
    if mode == "create":
        await modules.create(device_id, module_id, _identity_body(entry, ("authentication",)), actor=actor)
    elif not mode.startswith("updateTwin"):  # update* creates a missing module, as for devices
        body = _identity_body(entry, ("authentication",))
        try:
            await modules.get(device_id, module_id)
        except NotFound as exc:
            if exc.code != "ModuleNotFound":  # the device is missing
                raise
            await modules.create(device_id, module_id, body, actor=actor)
        else:
            await modules.replace(device_id, module_id, body, if_match=etag, actor=actor)
    twin = _twin_patch(entry)
    if twin is not None:
        await twins.patch(device_id, twin, if_match=None, actor=actor, module_id=module_id)


async def import_registry(
    registry: RegistryService,
    modules: ModuleService,
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

    def fail(line: int, device_id: Any, code: str, message: str, module_id: Any = None) -> None:
        error = {
            "line": line,
            "deviceId": device_id if isinstance(device_id, str) else None,
            "errorCode": code,
            "errorStatus": message,
        }
        if isinstance(module_id, str):
            error["moduleId"] = module_id
        errors.append(error)

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
        module_id = entry.get("moduleId")
        if module_id is not None and module_id != "":
            if pending:  # its device's line comes first
                await flush()
            try:
                if not isinstance(module_id, str):
                    raise BadRequest("moduleId must be a string", field="moduleId")
                await _apply_module_line(modules, twins, entry, actor)
            except TetherError as exc:
                fail(line, entry.get("id"), exc.code, exc.message, module_id)
            else:
                applied += 1
            if (applied + len(errors)) % 1000 == 0:
                await progress(applied + len(errors))
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
