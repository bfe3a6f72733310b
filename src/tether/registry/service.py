"""The device registry: Azure's identity-registry semantics over a `DeviceRepository`.

Every protocol surface (REST, CLI, MQTT/HTTP authentication) goes through this one service, so input
validation, server-managed fields, optimistic concurrency and auditing are implemented exactly once:

- input is validated strictly (unknown fields, bad ids, non-base64 keys → `BadRequest` naming the
  field), but server-managed fields (etag, generationId, connection state, timestamps, message count)
  are ignored, because the SDKs echo a fetched device back on update;
- every write gets a new opaque etag; `If-Match` (quoted, `*` or absent) is compared atomically by the
  repository, so of two writers holding the same etag exactly one wins;
- connection state and last activity are coalesced in memory by `touch()` and written in batches by
  `flush_activity()`, without changing the etag (as in Azure);
- status listeners run after a device is disabled or deleted, so protocol servers drop its sessions;
- `find()` (authentication) is cached and batched; `get()` and writes always read the database;
- `bulk()` (Azure's bulk registry operation) validates a whole batch of create/update/delete
  operations against the current registry, then writes it in one repository transaction
  (`apply_batch`), each update and delete guarded by the etag it was validated against.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tether.errors import BadRequest, Conflict, NotFound, PreconditionFailed, TetherError
from tether.registry import cache as dcache
from tether.registry.activity import ActivityBuffer
from tether.registry.batch import CoalescingLoader
from tether.registry.models import (
    DEVICE_ID_RE,
    EPOCH,
    Authentication,
    AuthType,
    ConnectionState,
    Device,
    DeviceStatus,
    RegistryStatistics,
    SymmetricKey,
    utcnow,
    validate_device_id,
)
from tether.security.audit import AuditLog
from tether.security.keys import generate_key
from tether.storage.base import DeviceRepository

log = logging.getLogger(__name__)

StatusListener = Callable[[Device], Awaitable[None]]

# Ignored on input (both spellings, since the model also accepts field names).
SERVER_MANAGED = frozenset(
    {
        "etag",
        "generationId", "generation_id",
        "connectionState", "connection_state",
        "connectionStateUpdatedTime", "connection_state_updated_time",
        "statusUpdatedTime", "status_updated_time",
        "lastActivityTime", "last_activity_time",
        "cloudToDeviceMessageCount", "cloud_to_device_message_count",
        "moduleId", "module_id",
    }
)
KEY_CHOICES = ("primary", "secondary", "both")
BULK_MODES = ("create", "update", "updateIfMatchETag", "delete", "deleteIfMatchETag")
MAX_BULK = 100  # Azure's limit per bulk registry call
MAX_LIST_TOP = 100_000
_WRITE_RETRIES = 8  # server-side read-modify-write attempts before giving up on a busy device


def new_etag() -> str:
    """Opaque version tag, base64 like Azure's (e.g. "MTIzNDU2Nzg=")."""
    return base64.b64encode(secrets.token_bytes(8)).decode("ascii")


def new_generation_id() -> str:
    """Distinguishes re-created devices with the same id; 18 digits like Azure's."""
    return str(10**17 + secrets.randbelow(9 * 10**17))


def parse_if_match(if_match: str | None) -> tuple[bool, str | None]:
    """(given, etag): `"abc"`/`W/"abc"` → (True, "abc"); `*` → (True, None); absent/blank → (False, None)."""
    if if_match is None or not if_match.strip():
        return False, None
    value = if_match.strip()
    if value.startswith("W/"):
        value = value[2:]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return True, (None if value == "*" else value)


def _strip_nulls(value: Any) -> Any:
    """Drop null members: the SDKs send `null` for every unset optional field."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _bad(exc: ValidationError) -> BadRequest:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "body"
    return BadRequest(f"{field}: {err['msg']}", field=field)


def _with_prefix(exc: TetherError, prefix: str) -> TetherError:
    """The same error, its message and field prefixed with the import line (`line N: field`)."""
    return type(exc)(f"{prefix}{exc.message}", code=exc.code, field=f"{prefix}{exc.field or 'body'}")


@dataclass(frozen=True, slots=True)
class BulkOperation:
    """One entry of a bulk registry call: `mode` is one of BULK_MODES (Azure's importMode), `body`
    the device fields (as for PUT), `etag` the caller's eTag for the *IfMatchETag modes."""

    device_id: str
    mode: str
    body: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class BulkError:
    """Why one operation of a refused batch failed (Azure's DeviceRegistryOperationError)."""

    device_id: str
    code: str
    message: str
    operation: str


_Step = tuple[Device | None, Device | None]  # (before, after): insert, replace or delete
BulkErrors = list[BulkError]  # empty: the batch was applied


def op_id(before: Device | None, after: Device | None) -> str:
    device = after or before
    return device.device_id if device is not None else ""


class RegistryService:
    """Validated, audited device identity registry."""

    def __init__(self, repo: DeviceRepository, audit: AuditLog, *, cache_ttl_s: float = dcache.DEFAULT_TTL_S,
                 cache_size: int = dcache.DEFAULT_MAX_ENTRIES,
                 negative_ttl_s: float = dcache.DEFAULT_NEGATIVE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`cache_ttl_s`: how late `find()` may see other processes' writes (0: no cache)."""
        self._cache = dcache.DeviceCache(ttl_s=cache_ttl_s, max_entries=cache_size,
                                         negative_ttl_s=negative_ttl_s, clock=clock)
        self._repo = dcache.InvalidatingRepository(repo, self._cache)  # writes invalidate
        self._loader = CoalescingLoader(self._repo.get_many)  # concurrent misses share one query
        self._audit = audit
        self._listeners, self._relays = list[StatusListener](), list[StatusListener]()
        self.activity = ActivityBuffer(self._repo)  # connection state / last activity, batched

    def add_status_listener(self, cb: StatusListener) -> None:
        self._listeners.append(cb)

    def add_status_relay(self, cb: StatusListener) -> None:
        """Like a status listener, but only for changes made through this process: the cluster bus
        uses it to tell the other hub nodes (which run `status_changed_elsewhere`)."""
        self._relays.append(cb)

    def add_write_relay(self, cb: Callable[[list[str]], None]) -> None:
        """`cb(device_ids)` after every write made through this process (other nodes drop their cached
        copies: a regenerated key or re-enabled device works everywhere at once, not after the TTL)."""
        self._repo.write_listeners.append(cb)

    async def status_changed_elsewhere(self, device: Device) -> None:
        """Another hub node disabled or deleted `device`: run this process's listeners, not relays."""
        self._cache.invalidate([device.device_id])
        await self._notify(device, relay=False)

    def invalidate(self, device_id: str | None = None) -> None:
        """Forget the cached copy of `device_id` (None: of every device), e.g. when the cluster bus
        hears that another node changed it; the next `find()` reads the database."""
        self._cache.invalidate(None if device_id is None else [device_id])

    # Reads -----------------------------------------------------------------------------------
    async def find(self, device_id: str) -> Device | None:
        """None for unknown or malformed ids (untrusted input). Cached for the per-CONNECT lookup
        (see `tether.registry.cache`): this service's writes drop entries at once, other nodes'
        disables/deletes arrive over the cluster bus, other changes within `cache_ttl_s`; cache
        misses of concurrent calls share one query (`tether.registry.batch`)."""
        if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
            return None
        hit, device = self._cache.lookup(device_id)
        if not hit:
            device = await self._load(device_id, batched=True)
        return None if device is None else self._overlay(device)

    async def _load(self, device_id: str, *, batched: bool = False) -> Device | None:
        """Read the database and refresh the cache (unless a write overlapped the read); only
        `find()` is `batched`, so a slow batch never holds up REST reads and writes."""
        token = self._cache.token()
        device = await (self._loader.load(device_id) if batched else self._repo.get(device_id))
        self._cache.store(device_id, device, token)
        return device

    async def get(self, device_id: str) -> Device:
        """Always fresh from the database (REST reads), unlike `find()`."""
        validate_device_id(device_id)
        device = await self._load(device_id)
        if device is None:
            raise NotFound(f"device {device_id} not found", code="DeviceNotFound", field="deviceId")
        return self._overlay(device)

    async def list(self, *, top: int = 1000, after: str | None = None) -> list[Device]:
        if not 1 <= top <= MAX_LIST_TOP:
            raise BadRequest(f"top must be between 1 and {MAX_LIST_TOP}", field="top")
        if after is not None and after != "" and not DEVICE_ID_RE.fullmatch(after):
            raise BadRequest("after must be a device id", field="after")
        return [self._overlay(d) for d in await self._repo.list(top=top, after=after or None)]

    async def statistics(self) -> RegistryStatistics:
        return await self._repo.statistics()

    async def export_devices(self) -> AsyncIterator[Device]:
        async for device in self._repo.iter_all():
            yield self._overlay(device)

    # Writes ----------------------------------------------------------------------------------
    async def create(self, device_id: str, body: dict[str, Any], *, actor: str) -> Device:
        device = self._new_device(device_id, body)
        await self._repo.insert(device)
        await self._record("device.create", device.device_id, actor)
        return device

    async def put(self, device_id: str, body: dict[str, Any], *, if_match: str | None, actor: str) -> Device:
        """Azure PUT: without If-Match create (409 if it exists); with an etag or `*` replace."""
        given, _ = parse_if_match(if_match)
        if not given:
            return await self.create(device_id, body, actor=actor)
        return await self.replace(device_id, body, if_match=if_match, actor=actor)

    async def replace(
        self, device_id: str, body: dict[str, Any], *, if_match: str | None, actor: str
    ) -> Device:
        validate_device_id(device_id)
        _, expected = parse_if_match(if_match)
        wanted = self._parse(device_id, body)

        def change(current: Device) -> Device:
            return self._merge(current, wanted)

        previous, device = await self._update(device_id, expected, change)
        details = {"status": device.status.value} if device.status != previous.status else None
        await self._record("device.update", device_id, actor, details)
        if previous.enabled and not device.enabled:
            await self._notify(device)
        return device

    async def delete(self, device_id: str, *, if_match: str | None, actor: str) -> None:
        validate_device_id(device_id)
        _, expected = parse_if_match(if_match)
        current = await self.get(device_id)
        if expected is not None and current.etag != expected:
            raise _stale(device_id)
        await self._repo.delete(device_id, expected)
        self.activity.forget(device_id)
        await self._record("device.delete", device_id, actor)
        await self._notify(current)

    async def set_status(
        self, device_id: str, enabled: bool, *, reason: str | None = None, actor: str
    ) -> Device:
        validate_device_id(device_id)
        if reason is not None and len(reason) > 128:
            raise BadRequest("statusReason must be at most 128 characters", field="statusReason")
        status = DeviceStatus.enabled if enabled else DeviceStatus.disabled

        def change(current: Device) -> Device:
            updated_time = current.status_updated_time if current.status == status else utcnow()
            return current.model_copy(
                update={"status": status, "status_reason": reason, "status_updated_time": updated_time}
            )

        _, device = await self._update(device_id, None, change)
        action = "device.enable" if enabled else "device.disable"
        await self._record(action, device_id, actor, {"reason": reason} if reason else None)
        if not enabled:
            await self._notify(device)
        return device

    async def regenerate_key(self, device_id: str, which: str, *, actor: str) -> Device:
        """New random symmetric key(s) for a sas device: `which` is primary, secondary or both."""
        validate_device_id(device_id)
        if which not in KEY_CHOICES:
            raise BadRequest(f"key must be one of {', '.join(KEY_CHOICES)}", field="which")

        def change(current: Device) -> Device:
            auth = regenerated_keys(current.authentication, which, f"device {device_id}")
            return current.model_copy(update={"authentication": auth})

        _, device = await self._update(device_id, None, change)
        await self._record("device.regenerate-key", device_id, actor, {"which": which})
        return device

    async def import_devices(self, records: Sequence[dict[str, Any]], *, actor: str) -> int:
        """All-or-nothing bulk create: every record is validated first (`line N: field` errors, N from
        1), then all are inserted in one transaction; an id that exists already writes nothing."""
        devices: list[Device] = []
        first_line: dict[str, int] = {}
        for number, record in enumerate(records, start=1):
            prefix = f"line {number}: "
            try:
                device = self._import_record(record)
            except TetherError as exc:
                raise _with_prefix(exc, prefix) from None
            seen = first_line.setdefault(device.device_id, number)
            if seen != number:
                raise Conflict(
                    f"{prefix}deviceId {device.device_id} repeats line {seen}",
                    code="DeviceAlreadyExists",
                    field=f"{prefix}deviceId",
                )
            devices.append(device)
        if not devices:
            return 0
        await self._repo.insert_many(devices)
        await self._record("device.import", None, actor, {"count": len(devices)})
        return len(devices)

    async def bulk(self, operations: Sequence[BulkOperation], *, actor: str,
                   apply: bool = True) -> BulkErrors:
        """All-or-nothing batch of creates, updates and deletes (Azure's semantics per importMode:
        `update*` creates a missing device, `delete*` needs an existing one, `*IfMatchETag` compares the
        etag). Every operation is checked first; any error returns every error and writes nothing
        (`apply=False`: only check)."""
        if len(operations) > MAX_BULK:
            raise BadRequest(f"at most {MAX_BULK} devices per bulk operation", field="body")
        errors: list[BulkError] = []
        steps: list[_Step] = []
        seen: set[str] = set()
        for op in operations:
            try:
                if op.device_id in seen:
                    raise BadRequest(f"device {op.device_id} appears more than once",
                                     code="DeviceDefinedMultipleTimes", field="id")
                seen.add(op.device_id)
                steps.append(await self._bulk_step(op))
            except TetherError as exc:
                errors.append(BulkError(op.device_id, exc.code, exc.message, op.mode))
        if errors or not steps or not apply:
            return errors
        inserts = [after for before, after in steps if before is None and after is not None]
        replaces = [(after, before.etag) for before, after in steps
                    if before is not None and after is not None]
        deletes = [(before.device_id, before.etag) for before, after in steps
                   if before is not None and after is None]
        try:
            await self._repo.apply_batch(inserts, replaces, deletes)
        except TetherError as exc:  # another writer got in after the check: nothing was written
            return [BulkError(await self._bulk_culprit(steps), exc.code,
                              f"changed during the bulk operation: {exc.message}", "bulk")]
        for before, after in steps:
            action = "create" if before is None else "delete" if after is None else "update"
            await self._record(f"device.{action}", op_id(before, after), actor, {"bulk": True})
            if before is not None and after is None:
                self.activity.forget(before.device_id)
                await self._notify(before)
            elif before is not None and after is not None and before.enabled and not after.enabled:
                await self._notify(after)
        return []

    async def _bulk_step(self, op: BulkOperation) -> _Step:
        if op.mode not in BULK_MODES:
            raise BadRequest(f"importMode {op.mode!r} is not supported (one of {', '.join(BULK_MODES)})",
                             code="InvalidOperation", field="importMode")
        validate_device_id(op.device_id, field="id")
        current = await self._repo.get(op.device_id)
        if op.mode.endswith("IfMatchETag") and current is not None:
            given, expected = parse_if_match(op.etag)
            if not given or (expected is not None and expected != current.etag):
                raise _stale(op.device_id)
        if op.mode.startswith("delete"):
            if current is None:
                raise NotFound(f"device {op.device_id} not found", code="DeviceNotFound", field="id")
            return current, None
        if current is None:
            return None, self._new_device(op.device_id, op.body)
        if op.mode == "create":
            raise Conflict(f"device {op.device_id} already exists", code="DeviceAlreadyExists", field="id")
        wanted = self._parse(op.device_id, op.body)
        return current, self._merge(current, wanted).model_copy(update={"etag": new_etag()})

    async def _bulk_culprit(self, steps: Sequence[_Step]) -> str:
        """The id of the first operation whose device no longer is as validated (the storage error
        names it only in prose); "" if the other writer's change is already gone again."""
        for before, after in steps:
            current = await self._repo.get(op_id(before, after))
            if (current.etag if current else None) != (before.etag if before else None):
                return op_id(before, after)
        return ""

    # Activity --------------------------------------------------------------------------------
    async def touch(self, device_id: str, module_id: str | None = None, *,
                    connected: bool | None = None) -> None:
        """Note activity of a device or, with `module_id`, of one of its modules (and a connect /
        disconnect when `connected` is given); written by the next `flush_activity()`, not per call."""
        await self.activity.touch(device_id, module_id, connected=connected)

    async def flush_activity(self) -> None:
        await self.activity.flush()

    # Internals -------------------------------------------------------------------------------
    def _parse(self, device_id: str, body: dict[str, Any]) -> Device:
        """Validate a client body against the path id; server-managed fields are dropped."""
        if not isinstance(body, dict):
            raise BadRequest("device body must be a JSON object", field="body")
        data = client_fields(body, "device")
        body_id = data.pop("deviceId", data.pop("device_id", device_id))
        if body_id != device_id:
            raise BadRequest(
                f"deviceId {body_id!r} in the body does not match {device_id!r}", field="deviceId"
            )
        try:
            device = Device.model_validate({**data, "deviceId": device_id})
        except ValidationError as exc:
            raise _bad(exc) from None
        check_authentication(device.authentication, "devices")
        return device

    def _new_device(self, device_id: str, body: dict[str, Any]) -> Device:
        validate_device_id(device_id)
        device = self._parse(device_id, body)
        return device.model_copy(
            update={
                "authentication": complete_keys(device.authentication, None),
                "generation_id": new_generation_id(),
                "etag": new_etag(),
                "status_updated_time": EPOCH,
                "connection_state": ConnectionState.disconnected,
                "connection_state_updated_time": EPOCH,
                "last_activity_time": EPOCH,
                "cloud_to_device_message_count": 0,
            }
        )

    def _import_record(self, record: dict[str, Any]) -> Device:
        if not isinstance(record, dict):
            raise BadRequest("each record must be a JSON object", field="body")
        record = dict(record)
        mode = record.pop("importMode", None)
        if mode is not None and str(mode).lower() != "create":
            raise BadRequest("only importMode 'create' is supported (imports are all-or-nothing)",
                             field="importMode")
        device_id = record.get("deviceId")
        if not isinstance(device_id, str):
            raise BadRequest("deviceId is required", field="deviceId")
        return self._new_device(device_id, record)

    @staticmethod
    def _merge(current: Device, wanted: Device) -> Device:
        """The replacement document: client-settable fields from `wanted`, the rest from `current`."""
        status_time = utcnow() if wanted.status != current.status else current.status_updated_time
        return wanted.model_copy(
            update={
                "authentication": complete_keys(wanted.authentication, current.authentication),
                "generation_id": current.generation_id,
                "status_updated_time": status_time,
                "connection_state": current.connection_state,
                "connection_state_updated_time": current.connection_state_updated_time,
                "last_activity_time": current.last_activity_time,
                "cloud_to_device_message_count": current.cloud_to_device_message_count,
            }
        )

    async def _update(
        self, device_id: str, expected: str | None, change: Callable[[Device], Device]
    ) -> tuple[Device, Device]:
        """Read-modify-write with a fresh etag, compare-and-set on the etag read. With an explicit
        `expected` etag a concurrent change is the caller's 412; with none (`*` or a server-side
        change) the read is retried. Returns (previous, written)."""
        for _ in range(_WRITE_RETRIES):
            current = await self._repo.get(device_id)
            if current is None:
                raise NotFound(f"device {device_id} not found", code="DeviceNotFound", field="deviceId")
            if expected is not None and current.etag != expected:
                raise _stale(device_id)
            device = change(current).model_copy(update={"etag": new_etag()})
            try:
                await self._repo.replace(device, current.etag)
            except PreconditionFailed:
                if expected is not None:
                    raise
                continue
            return current, self._overlay(device)
        raise PreconditionFailed(
            f"device {device_id} is changing too fast, try again", code="PreconditionFailed"
        )

    def _overlay(self, device: Device) -> Device:
        """Show activity not yet flushed, so reads are as fresh as the hub's own view."""
        return self.activity.overlay(device)

    async def _notify(self, device: Device, *, relay: bool = True) -> None:
        callbacks = [*self._relays, *self._listeners] if relay else list(self._listeners)
        for cb in callbacks:
            try:
                await cb(device)
            except Exception:
                log.exception("status listener failed for device %s", device.device_id)

    async def _record(
        self, action: str, target: str | None, actor: str, details: dict[str, Any] | None = None
    ) -> None:
        await self._audit.record(action, "ok", principal=actor, target=target, details=details)


def client_fields(body: dict[str, Any], what: str) -> dict[str, Any]:
    """A device or module body without nulls (the SDKs send `null` for every unset field) and
    without server-managed fields; `""` means unset for keys and thumbprints (portal/SDK habit)."""
    try:
        data = {k: v for k, v in _strip_nulls(body).items() if k not in SERVER_MANAGED}
    except RecursionError:  # json.loads accepts deeper nesting than this walk can take
        raise BadRequest(f"{what} body nests too deeply", field="body") from None
    auth = data.get("authentication")
    if isinstance(auth, dict):
        data["authentication"] = {
            k: {kk: vv for kk, vv in v.items() if vv != ""} if isinstance(v, dict) else v
            for k, v in auth.items()
        }
    return data


def check_authentication(auth: Authentication, noun: str) -> None:
    """The authentication section is consistent with its type (`noun`: "devices" or "modules")."""
    has_keys = bool(auth.symmetric_key.primary_key or auth.symmetric_key.secondary_key)
    thumbprints = auth.x509_thumbprint
    has_thumbprints = bool(thumbprints.primary_thumbprint or thumbprints.secondary_thumbprint)
    kind = auth.type.value
    if auth.type is AuthType.sas and has_thumbprints:
        raise BadRequest(f"sas {noun} take no x509 thumbprints", field="authentication.x509Thumbprint")
    if auth.type is not AuthType.sas and has_keys:
        raise BadRequest(f"{kind} {noun} take no symmetric keys", field="authentication.symmetricKey")
    if auth.type is AuthType.self_signed and not thumbprints.primary_thumbprint:
        raise BadRequest(
            f"selfSigned {noun} need a primary thumbprint",
            field="authentication.x509Thumbprint.primaryThumbprint",
        )
    if auth.type in (AuthType.certificate_authority, AuthType.none) and has_thumbprints:
        raise BadRequest(f"{kind} {noun} take no thumbprints", field="authentication.x509Thumbprint")


def complete_keys(auth: Authentication, current: Authentication | None) -> Authentication:
    """sas identities always have both keys: missing ones are kept from `current` or generated."""
    if auth.type is not AuthType.sas:
        return auth
    keys = auth.symmetric_key
    old = current.symmetric_key if current is not None else SymmetricKey()
    if current is not None and current.type is not AuthType.sas:
        old = SymmetricKey()
    new_keys = SymmetricKey(
        primary_key=keys.primary_key or old.primary_key or generate_key(),
        secondary_key=keys.secondary_key or old.secondary_key or generate_key(),
    )
    return auth.model_copy(update={"symmetric_key": new_keys})


def regenerated_keys(auth: Authentication, which: str, what: str) -> Authentication:
    """New random primary, secondary or both keys of a sas identity (`what` names it in errors)."""
    if which not in KEY_CHOICES:
        raise BadRequest(f"key must be one of {', '.join(KEY_CHOICES)}", field="which")
    if auth.type is not AuthType.sas:
        raise BadRequest(f"{what} uses {auth.type.value} authentication, it has no symmetric keys",
                         field="authentication.type")
    keys = auth.symmetric_key
    new_keys = SymmetricKey(
        primary_key=generate_key() if which in ("primary", "both") else keys.primary_key,
        secondary_key=generate_key() if which in ("secondary", "both") else keys.secondary_key,
    )
    return auth.model_copy(update={"symmetric_key": new_keys})


def _stale(device_id: str) -> PreconditionFailed:
    return PreconditionFailed(
        f"device {device_id}: If-Match etag does not match the current version", code="PreconditionFailed"
    )


__all__ = ["BULK_MODES", "KEY_CHOICES", "MAX_BULK", "SERVER_MANAGED", "BulkError", "BulkOperation",
           "RegistryService", "check_authentication", "client_fields", "complete_keys", "new_etag",
           "new_generation_id", "parse_if_match", "regenerated_keys"]
