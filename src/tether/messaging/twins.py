"""Device and module twins: tags (service only), desired properties (service writes, device reads) and
reported properties (device writes), in Azure IoT Hub's JSON shape and with Azure's semantics.

A module twin is the same document for a module identity (`module_id` on every call): its own
versions, etag and `$metadata`, `moduleId` in the JSON, no `capabilities`; deleting the module (or
its device) deletes it.

Promises:
- every write gets a new opaque `etag` and `version + 1`; each properties section has its own
  `$version`, raised when that section is written; `$metadata` records `$lastUpdated` (and
  `$lastUpdatedVersion` for desired) for every key, recursively, as Azure does;
- writes are optimistic (compare-and-set on the stored version) and retried internally when a device
  and a service (or two hub nodes) interleave; only a stale client `If-Match` gives 412;
- a device that exists but was never written has an empty twin with version 1 (no row is stored);
  deleting a device deletes its twin (foreign key cascade, plus a registry status listener);
- listeners, per identity (device id, module id or None): change listeners after every committed write
  made through this process (`add_change_listener`), then desired listeners after each committed
  desired change, in `$version` order within this process (`add_desired_listener`);
- the `configurations` section (automatic configurations' Applied / Targeted) is written only by
  `configure`; the JSON shows each configuration's status.

Document rules (limits, metadata, diff) live in `tether.messaging.twin_docs`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import replace as dc_replace
from datetime import datetime
from typing import Any

from tether.errors import BadRequest, NotFound, PreconditionFailed, TetherError
from tether.messaging.twin_docs import (
    DESIRED_LIMIT,
    REPORTED_LIMIT,
    TAGS_LIMIT,
    apply_patch,
    check_section,
    check_size,
    diff,
    iso,
    stamp,
    strip_nulls,
    without_reserved,
)
from tether.registry.models import EPOCH, Device, utcnow, validate_device_id
from tether.registry.modules import ModuleService, module_not_found
from tether.registry.service import RegistryService, new_etag, parse_if_match
from tether.security.audit import AuditLog
from tether.storage.sql.twins import TwinRecord, TwinRepository

log = logging.getLogger(__name__)

DesiredListener = Callable[[str, str | None, dict[str, Any]], Awaitable[None]]  # (device, module, patch)
ChangeListener = Callable[[str, str | None], None]  # (device, module): any committed write
ConfigurationDecision = Callable[[dict[str, Any], dict[str, Any]],
                                 "tuple[dict[str, Any] | None, dict[str, Any]] | None"]

INITIAL_ETAG = "AAAAAAAAAAE="  # Azure's etag of a twin that was never written
_WRITE_RETRIES = 16
# Twin fields a service may echo back from a fetched twin: ignored on PATCH/PUT (deviceId must match).
READ_ONLY_FIELDS = frozenset(
    {
        "deviceId", "moduleId", "etag", "deviceEtag", "version", "status", "statusReason",
        "statusUpdateTime", "connectionState", "lastActivityTime", "cloudToDeviceMessageCount",
        "authenticationType", "x509Thumbprint", "capabilities", "deviceScope", "parentScopes", "modelId",
    }
)
Mutation = Callable[[TwinRecord], "tuple[TwinRecord, dict[str, Any] | None] | None"]


def blank_record(device_id: str, module_id: str | None = None) -> TwinRecord:
    """The twin of a device (or module) that was never written."""
    epoch = iso(EPOCH)
    return TwinRecord(
        device_id=device_id,
        module_id=module_id,
        etag=INITIAL_ETAG,
        version=1,
        tags={},
        desired={},
        reported={},
        desired_version=1,
        reported_version=1,
        metadata={
            "desired": {"$lastUpdated": epoch, "$lastUpdatedVersion": 1},
            "reported": {"$lastUpdated": epoch},
        },
    )


def twin_document(device: Device, record: TwinRecord) -> dict[str, Any]:
    """Azure's twin JSON: registry fields of the device (or of a module's identity view,
    `Module.identity()`: then with `moduleId` and without `capabilities`) merged with the stored
    sections.

    The document shares the record's dicts (no copy: this is the query scan's hot path); every record
    the service hands in is freshly loaded or freshly built, and nothing else holds it."""
    metadata = record.metadata
    thumbprints = device.authentication.x509_thumbprint
    identity: dict[str, Any] = {"deviceId": device.device_id}
    if device.module_id is not None:
        identity["moduleId"] = device.module_id
    twin: dict[str, Any] = {
        **identity,
        "etag": record.etag,
        "deviceEtag": device.etag,
        "version": record.version,
        "status": device.status.value,
        "statusReason": device.status_reason,
        "statusUpdateTime": iso(device.status_updated_time),
        "connectionState": device.connection_state.value,
        "lastActivityTime": iso(device.last_activity_time),
        "cloudToDeviceMessageCount": device.cloud_to_device_message_count,
        "authenticationType": device.authentication.type.value,
        "x509Thumbprint": {
            "primaryThumbprint": thumbprints.primary_thumbprint,
            "secondaryThumbprint": thumbprints.secondary_thumbprint,
        },
        "capabilities": {"iotEdge": device.capabilities.iot_edge},
        "tags": record.tags,
        "properties": {
            "desired": {
                **record.desired,
                "$metadata": metadata.get("desired", {}),
                "$version": record.desired_version,
            },
            "reported": {
                **record.reported,
                "$metadata": metadata.get("reported", {}),
                "$version": record.reported_version,
            },
        },
    }
    if record.configurations:  # automatic configurations: Azure shows only their status
        twin["configurations"] = {cid: {"status": entry.get("status")}
                                  for cid, entry in record.configurations.items()}
    if device.module_id is not None:
        del twin["capabilities"]
    return twin


def _not_found(device_id: str) -> NotFound:
    return NotFound(f"device {device_id} not found", code="DeviceNotFound", field="deviceId")


def _name(device_id: str, module_id: str | None) -> str:
    return device_id if module_id is None else f"{device_id}/{module_id}"


def _parse_service_body(
    device_id: str, body: object, *, replace: bool, module_id: str | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(tags, desired) from a service PATCH/PUT body; None means "not given". Read-only twin fields
    echoed from a GET are ignored; anything else outside tags/properties.desired is refused."""
    if not isinstance(body, dict):
        raise BadRequest("twin body must be a JSON object", field="body")
    for key, value in body.items():
        if key in ("tags", "properties"):
            continue
        if key in READ_ONLY_FIELDS:
            if key == "deviceId" and value not in (None, device_id):
                raise BadRequest(f"deviceId {value!r} in the body does not match {device_id!r}",
                                 field="deviceId")
            if key == "moduleId" and value not in (None, module_id):
                raise BadRequest(f"moduleId {value!r} in the body does not match {module_id!r}",
                                 field="moduleId")
            continue
        raise BadRequest(f"{key} cannot be written: a service writes tags and properties.desired",
                         field=str(key))
    tags = body.get("tags")
    if tags is not None:
        tags = check_section("tags", tags)
    desired: dict[str, Any] | None = None
    properties = body.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise BadRequest("properties must be a JSON object", field="properties")
        for key in properties:
            if key == "desired" or (key == "reported" and replace):
                continue  # a PUT body is a whole twin: its reported section (the device's) is ignored
            if key == "reported":
                raise BadRequest("properties.reported is written by the device only",
                                 field="properties.reported")
            raise BadRequest(f"properties.{key} is not a twin section", field=f"properties.{key}")
        raw = properties.get("desired")
        if raw is not None:
            if not isinstance(raw, dict):
                raise BadRequest("properties.desired must be a JSON object", field="properties.desired")
            desired = check_section("properties.desired", without_reserved(raw))
    return tags, desired


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_device_json(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, malformed JSON, NaN, absurd nesting
        raise BadRequest(f"reported patch is not valid JSON: {exc}", field="body") from None
    if not isinstance(value, dict):
        raise BadRequest("reported patch must be a JSON object", field="body")
    return value


def _error_body(exc: TetherError) -> bytes:
    return json.dumps(exc.to_json(), separators=(",", ":")).encode()


class TwinService:
    """Validated, versioned, durable device and module twins over a `TwinRepository`."""

    def __init__(
        self,
        repo: TwinRepository,
        registry: RegistryService,
        audit: AuditLog,
        *,
        modules: ModuleService | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._repo = repo
        self._registry = registry
        self._modules = modules
        self._audit = audit
        self._clock = clock
        self._listeners: list[DesiredListener] = []
        self._relays: list[DesiredListener] = []
        self._change_listeners: list[ChangeListener] = []
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        registry.add_status_listener(self._on_device_status)
        if modules is not None:
            modules.add_listener(self._on_module_deleted)

    def add_desired_listener(self, cb: DesiredListener) -> None:
        """`cb(device_id, module_id, patch)` runs after every committed change of a device's
        (`module_id` None) or a module's desired properties.

        `patch` is a merge-patch (removed keys are null) plus `"$version"`: the new desired version,
        exactly the body and `$version` of `$iothub/twin/PATCH/properties/desired/?$version=n`. Each
        call gets its own copy. Within this process calls for one identity come in `$version` order
        (the twin's write lock is held while listeners run, so keep them quick: enqueue, don't wait on
        the network); other hub nodes' writes arrive through `notify_from_peer` when a cluster bus
        is configured. Exceptions are logged and ignored."""
        self._listeners.append(cb)

    def add_change_listener(self, cb: ChangeListener) -> None:
        """`cb(device_id, module_id)` after every committed write of a device's (`module_id` None) or
        a module's twin made through this process (tags, desired, reported, configurations), before
        the desired listeners of that write. Synchronous and quick: note it, work later (the
        configuration reconciler marks the device for re-evaluation). Exceptions are not caught."""
        self._change_listeners.append(cb)

    def add_desired_relay(self, cb: DesiredListener) -> None:
        """Like a desired listener, but skipped by `notify_from_peer`: the cluster bus forwards this
        process's desired changes to the other hub nodes with it (called in `$version` order)."""
        self._relays.append(cb)

    async def notify_from_peer(self, device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        """A desired change committed by another hub node: run this process's desired listeners
        (which push it to the device or module if it is connected here)."""
        await self._notify(device_id, module_id, patch, relay=False)

    # Reads -----------------------------------------------------------------------------------
    async def get(self, device_id: str, module_id: str | None = None) -> dict[str, Any]:
        """The full twin (Azure's twin JSON); 404 DeviceNotFound / ModuleNotFound."""
        identity, record = await self._load(device_id, module_id)
        return twin_document(identity, record)

    async def get_for_device(self, device_id: str, module_id: str | None = None) -> dict[str, Any]:
        """The MQTT twin GET body: `{"desired": {…, "$version": n}, "reported": {…, "$version": m}}`."""
        _, record = await self._load(device_id, module_id)
        return {
            "desired": {**record.desired, "$version": record.desired_version},
            "reported": {**record.reported, "$version": record.reported_version},
        }

    async def scan(self, *, after: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Twins of up to `limit` devices in device-id order after `after` (the query engine's pages)."""
        devices = await self._registry.list(top=limit, after=after)
        records = await self._repo.get_many([d.device_id for d in devices])
        return [twin_document(d, records.get(d.device_id) or blank_record(d.device_id)) for d in devices]

    async def scan_modules(self, *, after: tuple[str, str] | None = None,
                           limit: int = 500) -> list[dict[str, Any]]:
        """Module twins of up to `limit` modules in (device id, module id) order after `after`
        (`FROM devices.modules`)."""
        if self._modules is None:
            return []
        modules = await self._modules.scan(after=after, limit=limit)
        records = await self._repo.get_module_twins([m.key for m in modules])
        return [twin_document(m.identity(), records.get(m.key) or blank_record(*m.key)) for m in modules]

    # Service writes --------------------------------------------------------------------------
    async def patch(
        self, device_id: str, patch: dict[str, Any], *, if_match: str | None, actor: str,
        module_id: str | None = None,
    ) -> dict[str, Any]:
        """Service PATCH: merge `tags` and/or `properties.desired` (null removes a key)."""
        self._check_ids(device_id, module_id)
        tags_patch, desired_patch = _parse_service_body(device_id, patch, replace=False, module_id=module_id)
        tags_patch = tags_patch or None
        desired_patch = desired_patch or None
        now = self._clock()

        def mutate(current: TwinRecord) -> tuple[TwinRecord, dict[str, Any] | None] | None:
            if tags_patch is None and desired_patch is None:
                return None
            tags, desired, metadata = current.tags, current.desired, current.metadata
            desired_version = current.desired_version
            if tags_patch is not None:
                tags = copy.deepcopy(tags)
                apply_patch(tags, {}, tags_patch, {})
                check_size("tags", tags, TAGS_LIMIT)
            notice: dict[str, Any] | None = None
            if desired_patch is not None:
                desired_version += 1
                desired, metadata = copy.deepcopy(desired), copy.deepcopy(metadata)
                meta = metadata.setdefault("desired", {})
                apply_patch(desired, meta, desired_patch, stamp(now, desired_version))
                check_size("properties.desired", desired, DESIRED_LIMIT)
                notice = {**copy.deepcopy(desired_patch), "$version": desired_version}
            updated = dc_replace(current, tags=tags, desired=desired, metadata=metadata,
                                 desired_version=desired_version)
            return updated, notice

        sections = [name for name, part in (("tags", tags_patch), ("desired", desired_patch)) if part]
        return await self._service_write(device_id, module_id, if_match, mutate, "twin.update", actor,
                                         sections)

    async def replace(
        self, device_id: str, twin: dict[str, Any], *, if_match: str | None, actor: str,
        module_id: str | None = None,
    ) -> dict[str, Any]:
        """Service PUT: `tags` and `properties.desired` become exactly the body's (absent = empty);
        the rest of the body (reported, registry fields) is ignored. Devices get the difference."""
        self._check_ids(device_id, module_id)
        tags_body, desired_body = _parse_service_body(device_id, twin, replace=True, module_id=module_id)
        new_tags: dict[str, Any] = strip_nulls(tags_body or {})
        new_desired: dict[str, Any] = strip_nulls(desired_body or {})
        check_size("tags", new_tags, TAGS_LIMIT)
        check_size("properties.desired", new_desired, DESIRED_LIMIT)
        now = self._clock()

        def mutate(current: TwinRecord) -> tuple[TwinRecord, dict[str, Any] | None] | None:
            changes = diff(current.desired, new_desired)
            desired, metadata = current.desired, current.metadata
            desired_version = current.desired_version
            notice: dict[str, Any] | None = None
            if changes:
                desired_version += 1
                desired, metadata = copy.deepcopy(desired), copy.deepcopy(metadata)
                meta = metadata.setdefault("desired", {})
                apply_patch(desired, meta, changes, stamp(now, desired_version))
                notice = {**changes, "$version": desired_version}
            updated = dc_replace(current, tags=copy.deepcopy(new_tags), desired=desired,
                                 metadata=metadata, desired_version=desired_version)
            return updated, notice

        return await self._service_write(device_id, module_id, if_match, mutate, "twin.replace", actor,
                                         ["tags", "desired"])

    async def configure(self, device_id: str, decide: ConfigurationDecision, *, actor: str) -> bool:
        """Automatic device configuration write: `decide(twin document, stored configurations section)`
        returns None (nothing to do) or (desired merge-patch or None, the new `configurations` section).
        Decided again on the fresh twin when a concurrent writer gets in first; desired changes reach
        the device like a service PATCH. True when something was written; False for a device that is
        gone."""
        device = await self._registry.find(device_id)
        if device is None:
            return False
        now = self._clock()

        def mutate(current: TwinRecord) -> tuple[TwinRecord, dict[str, Any] | None] | None:
            result = decide(twin_document(device, current), current.configurations)
            if result is None:
                return None
            desired_patch, configurations = result
            desired, metadata, version = current.desired, current.metadata, current.desired_version
            notice: dict[str, Any] | None = None
            if desired_patch:
                version += 1
                desired, metadata = copy.deepcopy(desired), copy.deepcopy(metadata)
                apply_patch(desired, metadata.setdefault("desired", {}), desired_patch, stamp(now, version))
                check_size("properties.desired", desired, DESIRED_LIMIT)
                notice = {**copy.deepcopy(desired_patch), "$version": version}
            updated = dc_replace(current, desired=desired, metadata=metadata, desired_version=version,
                                 configurations=configurations)
            return updated, notice

        async with self._lock(device_id, None):
            try:
                _, record, notice, written = await self._write(device_id, None, None, mutate)
            except NotFound:  # deleted meanwhile
                return False
            if notice is not None:
                await self._notify(device_id, None, notice)
        if written and notice is not None:
            await self._audit.record("twin.configure", "ok", principal=actor, target=device_id,
                                     details={"sections": ["desired"], "version": record.version})
        return written

    # Device writes ---------------------------------------------------------------------------
    async def update_reported(self, device_id: str, patch: dict[str, Any],
                              module_id: str | None = None) -> int:
        """Device (or module) reported-properties PATCH (null removes a key); returns the new reported
        `$version`. Not audited: it is device traffic, like telemetry."""
        reported_patch = check_section("properties.reported", patch)
        now = self._clock()

        def mutate(current: TwinRecord) -> tuple[TwinRecord, dict[str, Any] | None] | None:
            reported, metadata = copy.deepcopy(current.reported), copy.deepcopy(current.metadata)
            meta = metadata.setdefault("reported", {})
            apply_patch(reported, meta, reported_patch, stamp(now, None))
            check_size("properties.reported", reported, REPORTED_LIMIT)
            updated = dc_replace(current, reported=reported, metadata=metadata,
                                 reported_version=current.reported_version + 1)
            return updated, None

        async with self._lock(device_id, module_id):
            _, record, _, _ = await self._write(device_id, module_id, None, mutate)
        return record.reported_version

    # Wire helpers for device protocols (MQTT twin topics) -------------------------------------
    async def device_get(self, device_id: str, module_id: str | None = None) -> tuple[int, bytes]:
        """(status, body) answering `$iothub/twin/GET`: 200 and the desired/reported JSON, or the
        error's HTTP status and `{"errorCode", "message"}`."""
        try:
            body = await self.get_for_device(device_id, module_id)
        except TetherError as exc:
            return exc.http_status, _error_body(exc)
        return 200, json.dumps(body, separators=(",", ":")).encode()

    async def device_patch_reported(self, device_id: str, payload: bytes,
                                    module_id: str | None = None) -> tuple[int, bytes, int | None]:
        """(status, body, new reported version) answering a reported-properties PATCH publish:
        204 with an empty body and the new `$version`, or 400/404/412… with an error body."""
        try:
            patch = _parse_device_json(payload)
            version = await self.update_reported(device_id, patch, module_id)
        except TetherError as exc:
            return exc.http_status, _error_body(exc), None
        return 204, b"", version

    # Internals -------------------------------------------------------------------------------
    @staticmethod
    def _check_ids(device_id: str, module_id: str | None) -> None:
        validate_device_id(device_id)
        if module_id is not None:
            validate_device_id(module_id, field="moduleId")

    def _lock(self, device_id: str, module_id: str | None) -> asyncio.Lock:
        """One lock per twin while anyone holds it: serialises this process's writes of a twin
        (fewer retries) and keeps desired notifications in order."""
        name = _name(device_id, module_id)  # ids never contain "/"
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    async def _identity(self, device_id: str, module_id: str | None) -> Device:
        """The device, or the module's identity view (cached lookups); 404 when unknown."""
        device = await self._registry.find(device_id)
        if device is None:
            raise _not_found(device_id)
        if module_id is None:
            return device
        module = None if self._modules is None else await self._modules.find_module(device_id, module_id)
        if module is None:
            raise module_not_found(device_id, module_id)
        return module

    async def _load(self, device_id: str, module_id: str | None) -> tuple[Device, TwinRecord]:
        self._check_ids(device_id, module_id)
        identity = await self._identity(device_id, module_id)
        record = await self._repo.get(device_id, module_id)
        return identity, record or blank_record(device_id, module_id)

    async def _service_write(
        self,
        device_id: str,
        module_id: str | None,
        if_match: str | None,
        mutate: Mutation,
        action: str,
        actor: str,
        sections: list[str],
    ) -> dict[str, Any]:
        _, expected = parse_if_match(if_match)
        async with self._lock(device_id, module_id):
            identity, record, notice, written = await self._write(device_id, module_id, expected, mutate)
            if notice is not None:
                await self._notify(device_id, module_id, notice)
        if written:
            await self._audit.record(action, "ok", principal=actor, target=_name(device_id, module_id),
                                     details={"sections": sections, "version": record.version})
        return twin_document(identity, record)

    async def _write(
        self, device_id: str, module_id: str | None, expected_etag: str | None, mutate: Mutation
    ) -> tuple[Device, TwinRecord, dict[str, Any] | None, bool]:
        """Read-modify-write with compare-and-set on the stored version; `mutate` returns the new
        record and the desired notice, or None for "nothing to write".
        Returns (identity, record, notice, written)."""
        name = _name(device_id, module_id)
        for attempt in range(_WRITE_RETRIES):
            identity = await self._identity(device_id, module_id)
            stored = await self._repo.get(device_id, module_id)
            current = stored or blank_record(device_id, module_id)
            if expected_etag is not None and current.etag != expected_etag:
                raise PreconditionFailed(
                    f"twin {name}: If-Match etag does not match the current version",
                    code="PreconditionFailed",
                )
            result = mutate(current)
            if result is None:
                return identity, current, None, False
            updated, notice = result
            updated = dc_replace(updated, etag=new_etag(), version=current.version + 1)
            if stored is None:
                written = await self._repo.insert(updated)
            else:
                written = await self._repo.update(updated, stored.version)
            if written:
                for listener in self._change_listeners:
                    listener(device_id, module_id)
                return identity, updated, notice, True
            # Another writer (a device, a service, another hub node) got in first: read again.
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise PreconditionFailed(f"twin {name} is changing too fast, try again", code="PreconditionFailed")

    async def _notify(self, device_id: str, module_id: str | None, notice: dict[str, Any], *,
                      relay: bool = True) -> None:
        callbacks = [*self._listeners, *self._relays] if relay else list(self._listeners)
        for cb in callbacks:
            try:
                await cb(device_id, module_id, copy.deepcopy(notice))
            except Exception:
                log.exception("desired listener failed for %s", _name(device_id, module_id))

    async def _on_device_status(self, device: Device) -> None:
        """Registry status listener: when the device is gone, so is its twin (the foreign key
        cascade already did it in SQL, module twins included; this keeps any other repository
        honest)."""
        if await self._registry.find(device.device_id) is None:
            await self._repo.delete(device.device_id)

    async def _on_module_deleted(self, device_id: str, module_id: str) -> None:
        """Module listener: the module's twin goes with it (cascade in SQL, as above)."""
        await self._repo.delete(device_id, module_id)


__all__ = ["INITIAL_ETAG", "ChangeListener", "ConfigurationDecision", "DesiredListener", "TwinService",
           "blank_record", "twin_document"]
