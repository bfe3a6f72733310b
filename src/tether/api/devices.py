"""Device identity routes: Azure's `/devices` (including the bulk registry operation, `POST /devices`)
and `/statistics/devices`, plus Tether's `/tether/devices/...` conveniences (enable/disable, key
regeneration, bulk import/export).

Handlers parse and validate the whole request before calling the registry; the registry itself
validates the device body before it writes, so a refused request leaves storage untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from tether.api.bodies import (
    body_limit,
    loads,
    parse_if_match,
    parse_ndjson,
    query_choice,
    read_body,
    read_json_object,
    read_optional_json_object,
)
from tether.api.context import hub_of, peer_of, principal_of
from tether.errors import BadRequest, Forbidden, TetherError
from tether.registry.models import (
    Authentication,
    Capabilities,
    Device,
    DeviceStatus,
    SymmetricKey,
    validate_device_id,
)
from tether.registry.service import BULK_MODES, MAX_BULK, BulkError, BulkOperation
from tether.security.disclosure import may_read_device_keys

MAX_TOP = 1000
CONTINUATION = "x-ms-continuation"
NDJSON = "application/x-ndjson"
EXPORT_FLUSH_BYTES = 65_536
KEY_CHOICES = ("primary", "secondary", "both")
_LINE_RE = re.compile(r"\bline (\d+)\b")


class ImportResult(BaseModel):
    imported: int = Field(description="Number of devices created (all or nothing).")


class StatusChange(BaseModel):
    """Body of `POST /tether/devices/{id}/disable` (optional for enable)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=128, description="Stored as the device's statusReason.")


class ExportImportDevice(BaseModel):
    """One entry of Azure's bulk registry operation (`POST /devices`). Twin fields (`tags`,
    `properties`, `twinETag`) and modules (`moduleId`) are refused per entry: not supported in bulk."""

    model_config = ConfigDict(populate_by_name=True)
    id: str = Field(description="Device id.")
    import_mode: Literal["create", "update", "updateIfMatchETag", "delete", "deleteIfMatchETag"] = Field(
        alias="importMode", description="create: 409-style error if it exists; update*: create or replace; "
        "delete*: the device must exist; *IfMatchETag: `eTag` must match.")
    e_tag: str | None = Field(None, alias="eTag")
    status: DeviceStatus | None = None
    status_reason: str | None = Field(None, alias="statusReason")
    authentication: Authentication | None = None
    capabilities: Capabilities | None = None
    device_scope: str | None = Field(None, alias="deviceScope")
    parent_scopes: list[str] | None = Field(None, alias="parentScopes")


class BulkRequest(RootModel[list[ExportImportDevice]]):
    """At most 100 entries, each device id at most once."""


class DeviceRegistryOperationError(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    device_id: str = Field(alias="deviceId")
    error_code: str = Field(alias="errorCode", description="e.g. DeviceAlreadyExists, DeviceNotFound, "
                            "PreconditionFailed, ArgumentInvalid, DeviceDefinedMultipleTimes")
    error_status: str = Field(alias="errorStatus")
    operation: str = Field(description="The entry's importMode.")


class BulkRegistryOperationResult(BaseModel):
    """200 with isSuccessful=true (everything applied) or 400 with isSuccessful=false (nothing applied)."""

    model_config = ConfigDict(populate_by_name=True)
    is_successful: bool = Field(alias="isSuccessful")
    errors: list[DeviceRegistryOperationError]
    warnings: list[dict[str, Any]]


_BULK_ENVELOPE = frozenset({"id", "importMode", "eTag"})
_BULK_UNSUPPORTED = ("moduleId", "twinETag", "tags", "properties")
_MODES = {mode.lower(): mode for mode in BULK_MODES}


def _bulk_operation(index: int, entry: Any) -> BulkOperation | BulkError:
    """An ExportImportDevice as a registry operation, or the entry's error (checked before any write)."""
    if not isinstance(entry, dict):
        return BulkError("", "ArgumentInvalid", f"entry {index}: must be a JSON object", "")
    device_id, raw_mode = entry.get("id"), entry.get("importMode")
    if not isinstance(device_id, str):
        return BulkError("", "ArgumentInvalid", f"entry {index}: id is required", str(raw_mode or ""))
    mode = _MODES.get(raw_mode.lower()) if isinstance(raw_mode, str) else None
    if mode is None:
        return BulkError(device_id, "InvalidOperation",
                         f"importMode must be one of {', '.join(BULK_MODES)}", str(raw_mode or ""))
    unsupported = [name for name in _BULK_UNSUPPORTED if entry.get(name) not in (None, {}, "")]
    if unsupported:
        return BulkError(device_id, "ArgumentInvalid",
                         f"{', '.join(unsupported)}: not supported in bulk operations", mode)
    etag = entry.get("eTag")
    if etag is not None and not isinstance(etag, str):
        return BulkError(device_id, "ArgumentInvalid", "eTag must be a string", mode)
    body = {k: v for k, v in entry.items() if k not in _BULK_ENVELOPE and k not in _BULK_UNSUPPORTED}
    return BulkOperation(device_id, mode, body, etag)


async def bulk_devices(request: web.Request) -> web.Response:
    """Azure's bulk registry operation: all or nothing. Every entry is checked (shape here, then
    existence, etags and device bodies in the registry); any error answers 400 with the result
    listing every failed entry and writes nothing."""
    try:
        entries = loads(await read_body(request, body_limit(request)))
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}", field="body") from None
    if not isinstance(entries, list) or not entries:
        raise BadRequest("body must be a non-empty JSON array of ExportImportDevice objects", field="body")
    if len(entries) > MAX_BULK:
        raise BadRequest(f"at most {MAX_BULK} devices per bulk operation", field="body")
    parsed = [_bulk_operation(i, entry) for i, entry in enumerate(entries)]
    malformed = [p for p in parsed if isinstance(p, BulkError)]
    operations = [p for p in parsed if isinstance(p, BulkOperation)]
    errors = malformed + await hub_of(request).registry.bulk(
        operations, actor=principal_of(request).name, apply=not malformed
    )
    result = BulkRegistryOperationResult(
        is_successful=not errors,
        errors=[DeviceRegistryOperationError(device_id=e.device_id, error_code=e.code, error_status=e.message,
                                             operation=e.operation) for e in errors],
        warnings=[],
    )
    return web.json_response(result.model_dump(mode="json", by_alias=True), status=400 if errors else 200)


def path_device_id(request: web.Request) -> str:
    return validate_device_id(request.match_info["id"], field="deviceId")


def device_response(device: Device, *, status: int = 200) -> web.Response:
    return web.json_response(device.to_wire(), status=status, headers={"ETag": f'"{device.etag}"'})


async def put_device(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)  # the registry checks body deviceId == path id
    device = await hub_of(request).registry.put(
        device_id, body, if_match=if_match, actor=principal_of(request).name
    )
    return device_response(await with_queue_depth(request, device))


async def with_queue_depth(request: web.Request, device: Device) -> Device:
    """`cloudToDeviceMessageCount` is the live C2D queue depth, computed on read: storing it would
    change the device etag on every send."""
    depth = await hub_of(request).c2d.queue_depth(device.device_id)
    return device.model_copy(update={"cloud_to_device_message_count": depth})


def _shown(request: web.Request, device: Device) -> Device:
    """The device as this caller may see it: without its keys for a caller that could not act as the
    device anyway (RegistryRead only; `tether.security.disclosure`)."""
    keys = device.authentication.symmetric_key
    if may_read_device_keys(principal_of(request)) or not (keys.primary_key or keys.secondary_key):
        return device
    authentication = device.authentication.model_copy(update={"symmetric_key": SymmetricKey()})
    return device.model_copy(update={"authentication": authentication})


async def get_device(request: web.Request) -> web.Response:
    device = await hub_of(request).registry.get(path_device_id(request))
    return device_response(_shown(request, await with_queue_depth(request, device)))


async def delete_device(request: web.Request) -> web.Response:
    """A missing If-Match is taken as `*` (unconditional); the Azure SDK always sends one."""
    device_id = path_device_id(request)
    if_match = parse_if_match(request.headers.get("If-Match")) or "*"
    await hub_of(request).registry.delete(device_id, if_match=if_match, actor=principal_of(request).name)
    return web.Response(status=204)


async def list_devices(request: web.Request) -> web.Response:
    """Azure answers a bare JSON array; Tether pages with `x-ms-continuation` = the last id."""
    raw_top = request.query.get("top") or ""
    try:
        top = int(raw_top) if raw_top else MAX_TOP
    except ValueError:
        raise BadRequest("top must be an integer", field="top") from None
    if not 1 <= top <= MAX_TOP:
        top = MAX_TOP  # Azure: "any value outside the range of 1-1000 is considered to be 1000"
    after = request.headers.get(CONTINUATION) or request.query.get("continuationToken") or None
    if after is not None:
        validate_device_id(after, field=CONTINUATION)
    devices = await hub_of(request).registry.list(top=top, after=after)
    headers = {"x-ms-item-type": "Device"}
    if len(devices) == top:
        headers[CONTINUATION] = devices[-1].device_id
    return web.json_response([_shown(request, d).to_wire() for d in devices], headers=headers)


async def device_statistics(request: web.Request) -> web.Response:
    stats = await hub_of(request).registry.statistics()
    return web.json_response(stats.model_dump(mode="json", by_alias=True))


async def enable_device(request: web.Request) -> web.Response:
    return await _set_status(request, enabled=True)


async def disable_device(request: web.Request) -> web.Response:
    return await _set_status(request, enabled=False)


async def _set_status(request: web.Request, *, enabled: bool) -> web.Response:
    device_id = path_device_id(request)
    body = await read_optional_json_object(request)
    try:
        change = StatusChange.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    device = await hub_of(request).registry.set_status(
        device_id, enabled, reason=change.reason, actor=principal_of(request).name
    )
    return device_response(device)


async def regenerate_device_key(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    which = query_choice(request, "key", KEY_CHOICES, default="primary")
    device = await hub_of(request).registry.regenerate_key(device_id, which, actor=principal_of(request).name)
    return device_response(device)


def validation_error(exc: ValidationError, *, prefix: str = "") -> BadRequest:
    """First pydantic error as a BadRequest naming the field by its JSON path."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "body"
    return BadRequest(f"{prefix}{field}: {err['msg']}", field=f"{prefix}{field}")


async def import_devices(request: web.Request) -> web.Response:
    """All-or-nothing: the registry validates every record (numbered `line N: field` errors)
    before its single transactional insert."""
    records = parse_ndjson(await read_body(request, body_limit(request, bulk=True)))
    if not records:
        raise BadRequest("import body has no devices (one JSON object per line)", field="body")
    try:
        count = await hub_of(request).registry.import_devices(
            [record for _, record in records], actor=principal_of(request).name
        )
    except TetherError as exc:
        raise _renumber(exc, [number for number, _ in records]) from None
    return web.json_response(ImportResult(imported=count).model_dump())


def _renumber(exc: TetherError, lines: list[int]) -> TetherError:
    """The registry numbers records 1..n; blank lines were skipped, so map back to body lines."""

    def line(match: re.Match[str]) -> str:
        index = int(match[1])
        return f"line {lines[index - 1]}" if 1 <= index <= len(lines) else match[0]

    def fix(text: str | None) -> str | None:
        return None if text is None else _LINE_RE.sub(line, text)

    message = fix(exc.message) or exc.message
    return type(exc)(f"nothing imported: {message}", code=exc.code, field=fix(exc.field))


async def export_devices(request: web.Request) -> web.StreamResponse:
    """Every device, keys included, one JSON object per line, streamed in ~64 KiB writes. The keys make
    it a credential dump: only for callers that may read device keys (403 otherwise); audited as
    `device.keys.read` either way."""
    principal = principal_of(request)
    allowed = may_read_device_keys(principal)
    await hub_of(request).audit.record(
        "device.keys.read", "allowed" if allowed else "refused", principal=principal.name,
        credential=str(principal.credential), reason=None if allowed else "missing-permission",
        peer=peer_of(request), details={"operation": "export"})
    if not allowed:
        raise Forbidden("the export contains every device key: it needs RegistryReadWrite or DeviceConnect",
                        code="IotHubUnauthorizedAccess")
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    buffer: list[bytes] = []
    size = 0
    try:
        async for device in hub_of(request).registry.export_devices():
            line = json.dumps(device.to_wire(), separators=(",", ":")).encode() + b"\n"
            buffer.append(line)
            size += len(line)
            if size >= EXPORT_FLUSH_BYTES:
                if not response.prepared:
                    await response.prepare(request)
                await response.write(b"".join(buffer))
                buffer, size = [], 0
        if not response.prepared:
            await response.prepare(request)
        if buffer:
            await response.write(b"".join(buffer))
        await response.write_eof()
    except ConnectionResetError:  # the client went away mid-stream; nothing left to answer
        pass
    return response


__all__ = [
    "BulkRegistryOperationResult",
    "BulkRequest",
    "ExportImportDevice",
    "ImportResult",
    "StatusChange",
    "bulk_devices",
    "delete_device",
    "device_statistics",
    "disable_device",
    "enable_device",
    "export_devices",
    "get_device",
    "import_devices",
    "list_devices",
    "put_device",
    "regenerate_device_key",
    "with_queue_depth",
]
