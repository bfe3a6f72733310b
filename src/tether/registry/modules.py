"""Module identities: Azure's `/devices/{id}/modules/{mid}` registry over a `ModuleRepository`.

A module is an identity of its own under a device (IoT Edge modules, or several applications on one
device): own keys or X.509 credentials, own twin, own connection and connection state. The rules are
the device registry's (`tether.registry.service`): strict input (unknown fields, bad ids, non-base64
keys are 400s naming the field), server-managed fields ignored (the SDKs echo a fetched module back),
a fresh etag per write compared atomically with `If-Match`, missing sas keys generated, every write
audited (`module.create`, `module.update`, `module.delete`, `module.regenerate-key`; target
`{device}/{module}`). Modules have no status: a module connects while its device is enabled.

- `find_module()` (authentication, on every CONNECT) is cached like `RegistryService.find`: this
  service's writes drop the entry at once, other nodes' writes arrive over the cluster bus
  (`invalidate`), anything else within the cache TTL;
- deleting a module runs the module listeners (its connection is closed, its method subscription and
  session forgotten) and relays (the cluster bus tells the other nodes, which run
  `deleted_elsewhere`); deleting the device deletes its modules and their twins (foreign keys), and
  the device's own status listeners close the module connections;
- a device holds at most `max_per_device` modules (`MAX_MODULES_PER_DEVICE`, 403 IotHubQuotaExceeded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from tether.errors import BadRequest, NotFound, PreconditionFailed
from tether.registry import cache as dcache
from tether.registry.models import (
    DEVICE_ID_RE,
    EPOCH,
    ConnectionState,
    Device,
    Module,
    validate_device_id,
)
from tether.registry.service import (
    RegistryService,
    check_authentication,
    client_fields,
    complete_keys,
    new_etag,
    new_generation_id,
    parse_if_match,
    regenerated_keys,
)
from tether.security.audit import AuditLog
from tether.storage.base import ModuleKey, ModuleRepository

__all__ = ["MAX_MODULES_PER_DEVICE", "ModuleListener", "ModuleService", "module_not_found"]

log = logging.getLogger(__name__)

MAX_MODULES_PER_DEVICE = 50
ModuleListener = Callable[[str, str], Awaitable[None]]  # (device id, module id) after a delete
_WRITE_RETRIES = 8
_FIELDS = frozenset({"moduleId", "module_id", "deviceId", "device_id", "managedBy", "managed_by",
                     "authentication"})


def module_not_found(device_id: str, module_id: str) -> NotFound:
    return NotFound(f"module {module_id} of device {device_id} not found", code="ModuleNotFound",
                    field="moduleId")


def _name(device_id: str, module_id: str) -> str:
    return f"{device_id}/{module_id}"


class ModuleService:
    """Validated, audited module identities; built by the hub next to the `RegistryService`."""

    def __init__(self, repo: ModuleRepository, registry: RegistryService, audit: AuditLog, *,
                 max_per_device: int = MAX_MODULES_PER_DEVICE, cache_ttl_s: float = dcache.DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._repo = repo
        self._registry = registry
        self._audit = audit
        self.max_per_device = max_per_device
        # Identity views (`Module.identity()`) keyed "{device}/{module}": ids never contain "/".
        self._cache = dcache.DeviceCache(ttl_s=cache_ttl_s, clock=clock)
        self._listeners: list[ModuleListener] = []
        self._relays: list[ModuleListener] = []
        self._write_relays: list[Callable[[list[ModuleKey]], None]] = []
        registry.add_status_listener(self._on_device_status)

    # Hooks ----------------------------------------------------------------------------------
    def add_listener(self, cb: ModuleListener) -> None:
        """`cb(device_id, module_id)` after a module was deleted (through this process or another)."""
        self._listeners.append(cb)

    def add_relay(self, cb: ModuleListener) -> None:
        """Like a listener, but only for deletes made through this process (the cluster bus)."""
        self._relays.append(cb)

    def add_write_relay(self, cb: Callable[[list[ModuleKey]], None]) -> None:
        """`cb(keys)` after every write made through this process (other nodes drop cached copies)."""
        self._write_relays.append(cb)

    async def deleted_elsewhere(self, device_id: str, module_id: str) -> None:
        """Another hub node deleted the module: forget it here and run the listeners (not relays)."""
        self.invalidate(device_id, module_id)
        await self._notify(device_id, module_id, relay=False)

    def invalidate(self, device_id: str | None = None, module_id: str | None = None) -> None:
        """Forget the cached identity (no arguments: every cached module)."""
        if device_id is None or module_id is None:
            self._cache.invalidate(None)
        else:
            self._cache.invalidate([_name(device_id, module_id)])

    # Reads ----------------------------------------------------------------------------------
    async def find_module(self, device_id: str, module_id: str) -> Device | None:
        """The module's identity view (`Module.identity()`), None when unknown or malformed
        (untrusted input): the authenticator's `ModuleLookup`. Cached (see the module docstring)."""
        if not (isinstance(device_id, str) and isinstance(module_id, str)
                and DEVICE_ID_RE.fullmatch(device_id) and DEVICE_ID_RE.fullmatch(module_id)):
            return None
        key = _name(device_id, module_id)
        hit, identity = self._cache.lookup(key)
        if hit:
            return identity
        token = self._cache.token()
        module = await self._repo.get(device_id, module_id)
        identity = None if module is None else module.identity()
        self._cache.store(key, identity, token)
        return identity

    async def get(self, device_id: str, module_id: str) -> Module:
        """Fresh from the database, with unflushed activity; 404 DeviceNotFound / ModuleNotFound."""
        validate_device_id(device_id)
        validate_device_id(module_id, field="moduleId")
        module = await self._repo.get(device_id, module_id)
        if module is None:
            await self._registry.get(device_id)  # DeviceNotFound first, as Azure answers
            raise module_not_found(device_id, module_id)
        return self._registry.activity.overlay(module)

    async def scan(self, *, after: ModuleKey | None, limit: int) -> list[Module]:
        """Every module in (device id, module id) order, for queries over `devices.modules`."""
        return [self._registry.activity.overlay(m) for m in await self._repo.scan(after=after, limit=limit)]

    async def list(self, device_id: str) -> list[Module]:
        """The device's modules by module id; 404 DeviceNotFound for an unknown device."""
        await self._registry.get(device_id)
        return [self._registry.activity.overlay(m) for m in await self._repo.for_device(device_id)]

    # Writes ---------------------------------------------------------------------------------
    async def put(self, device_id: str, module_id: str, body: dict[str, Any], *, if_match: str | None,
                  actor: str) -> Module:
        """Azure PUT: without If-Match create (409 if it exists); with an etag or `*` replace."""
        given, _ = parse_if_match(if_match)
        if not given:
            return await self.create(device_id, module_id, body, actor=actor)
        return await self.replace(device_id, module_id, body, if_match=if_match, actor=actor)

    async def create(self, device_id: str, module_id: str, body: dict[str, Any], *, actor: str) -> Module:
        wanted = self._parse(device_id, module_id, body)
        module = wanted.model_copy(update={
            "authentication": complete_keys(wanted.authentication, None),
            "generation_id": new_generation_id(),
            "etag": new_etag(),
            "connection_state": ConnectionState.disconnected,
            "connection_state_updated_time": EPOCH,
            "last_activity_time": EPOCH,
            "cloud_to_device_message_count": 0,
        })
        try:
            await self._repo.insert(module, max_per_device=self.max_per_device)
        finally:
            self._written(module.key)
        await self._record("module.create", module.key, actor)
        return module

    async def replace(self, device_id: str, module_id: str, body: dict[str, Any], *, if_match: str | None,
                      actor: str) -> Module:
        wanted = self._parse(device_id, module_id, body)
        _, expected = parse_if_match(if_match)

        def change(current: Module) -> Module:
            return current.model_copy(update={
                "managed_by": wanted.managed_by,
                "authentication": complete_keys(wanted.authentication, current.authentication),
            })

        module = await self._update(device_id, module_id, expected, change)
        await self._record("module.update", module.key, actor)
        return module

    async def regenerate_key(self, device_id: str, module_id: str, which: str, *, actor: str) -> Module:
        """New random symmetric key(s) for a sas module: `which` is primary, secondary or both."""
        validate_device_id(device_id)
        validate_device_id(module_id, field="moduleId")

        def change(current: Module) -> Module:
            auth = regenerated_keys(current.authentication, which, f"module {_name(device_id, module_id)}")
            return current.model_copy(update={"authentication": auth})

        module = await self._update(device_id, module_id, None, change)
        await self._record("module.regenerate-key", module.key, actor, {"which": which})
        return module

    async def delete(self, device_id: str, module_id: str, *, if_match: str | None, actor: str) -> None:
        """Delete the module and its twin; its connection is closed (module listeners)."""
        current = await self.get(device_id, module_id)
        _, expected = parse_if_match(if_match)
        if expected is not None and current.etag != expected:
            raise _stale(device_id, module_id)
        try:
            await self._repo.delete(device_id, module_id, expected)
        finally:
            self._written(current.key)
        self._registry.activity.forget(device_id, module_id)
        await self._record("module.delete", current.key, actor)
        await self._notify(device_id, module_id)

    # Internals ------------------------------------------------------------------------------
    def _parse(self, device_id: str, module_id: str, body: dict[str, Any]) -> Module:
        """Validate a client body against the path ids; server-managed fields are dropped."""
        validate_device_id(device_id)
        validate_device_id(module_id, field="moduleId")
        if not isinstance(body, dict):
            raise BadRequest("module body must be a JSON object", field="body")
        for key, path_value in (("moduleId", module_id), ("deviceId", device_id)):
            given = body.get(key)
            if given is not None and given != path_value:
                raise BadRequest(f"{key} {given!r} in the body does not match {path_value!r}", field=key)
        data = {k: v for k, v in client_fields(body, "module").items()
                if k not in ("deviceId", "device_id")}
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise BadRequest(f"{unknown[0]}: not a module field", field=unknown[0])
        try:
            module = Module.model_validate({**data, "deviceId": device_id, "moduleId": module_id})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise BadRequest(f"{field}: {err['msg']}", field=field) from None
        check_authentication(module.authentication, "modules")
        return module

    async def _update(self, device_id: str, module_id: str, expected: str | None,
                      change: Callable[[Module], Module]) -> Module:
        """Read-modify-write with a fresh etag, compare-and-set on the etag read (see the registry)."""
        for _ in range(_WRITE_RETRIES):
            current = await self._repo.get(device_id, module_id)
            if current is None:
                await self._registry.get(device_id)
                raise module_not_found(device_id, module_id)
            if expected is not None and current.etag != expected:
                raise _stale(device_id, module_id)
            module = change(current).model_copy(update={"etag": new_etag()})
            try:
                await self._repo.replace(module, current.etag)
            except PreconditionFailed:
                if expected is not None:
                    raise
                continue
            finally:
                self._written(module.key)
            return self._registry.activity.overlay(module)
        raise PreconditionFailed(f"module {_name(device_id, module_id)} is changing too fast, try again")

    def _written(self, key: ModuleKey) -> None:
        self._cache.invalidate([_name(*key)])
        for relay in self._write_relays:
            relay([key])

    async def _notify(self, device_id: str, module_id: str, *, relay: bool = True) -> None:
        callbacks = [*self._relays, *self._listeners] if relay else list(self._listeners)
        for cb in callbacks:
            try:
                await cb(device_id, module_id)
            except Exception:
                log.exception("module listener failed for %s/%s", device_id, module_id)

    async def _on_device_status(self, device: Device) -> None:
        """A deleted device took its modules with it (cascade): forget every cached module."""
        if device.enabled:  # a deleted device is reported enabled
            self._cache.invalidate(None)

    async def _record(self, action: str, key: ModuleKey, actor: str,
                      details: dict[str, Any] | None = None) -> None:
        await self._audit.record(action, "ok", principal=actor, target=_name(*key), details=details)


def _stale(device_id: str, module_id: str) -> PreconditionFailed:
    return PreconditionFailed(
        f"module {_name(device_id, module_id)}: If-Match etag does not match the current version",
        code="PreconditionFailed",
    )
