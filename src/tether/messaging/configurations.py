"""Automatic device configurations (Azure's `/configurations`): desired properties applied to every twin a
target condition selects, the highest priority winning per device (ties: the newest creation wins),
with metrics.

Promises (Azure's rules, docs `iot-hub-automatic-device-management`):
- `content.deviceContent` paths start at `properties.desired` and cannot change after creation;
  target condition, priority, labels and metrics can (`PUT` with `If-Match`, quoted, unquoted or `*`);
- for each device the winning configuration is `Applied` (its content is written to the twin's desired
  properties once, when it starts to win) and every other targeting one `Targeted`, visible in the twin
  as `configurations.{id}.status`; when a device stops being targeted by its applied configuration
  (condition, priority, deletion) that configuration's settings are removed and the next winner's
  applied;
- metrics: `systemMetrics` `targetedCount` / `appliedCount`, and up to 5 user `metrics.queries`, each
  the number of twins its query selects; counted after every reconciliation and every sweep.
- module content: automatic configurations refuse `modulesContent` / `moduleContent` (400 NotSupported);
  `applyConfigurationContent` writes `modulesContent` to one device's module twins.

`ConfigurationReconciler` keeps twins current: twin change listeners mark devices, a background task
decides them again at once; a full sweep (every `jobs.configuration_sweep_s`, and after each
configuration change) catches what listeners cannot see (other nodes' writes, new configurations).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from tether.errors import BadRequest, NotFound
from tether.messaging.jobs.targets import matching_twins, parse_condition
from tether.messaging.lease import Leadership
from tether.messaging.query import Query, parse_query
from tether.messaging.query.evaluator import matches
from tether.messaging.twin_docs import DESIRED_LIMIT, check_section, check_size
from tether.messaging.twins import TwinService
from tether.registry.service import new_etag, parse_if_match
from tether.security.audit import AuditLog
from tether.storage.sql.configurations import ConfigurationRecord, SqlConfigurationRepository

__all__ = ["MAX_CONFIGURATIONS", "ConfigurationReconciler", "ConfigurationService", "Rule", "decide"]

log = logging.getLogger("tether.configurations")

MAX_CONFIGURATIONS: Final = 100
MAX_METRICS: Final = 5
MAX_MODULES_CONTENT: Final = 50  # modules a device may have
DESIRED_PREFIX: Final = "properties.desired"
_ID = re.compile(r"[A-Za-z0-9\-:+%_#*?!(),=@;'.]{1,128}")


def _iso(ms: int) -> str:
    from tether.messaging.jobs.model import iso_ms

    return iso_ms(ms) or ""


def _desired_path(path: str, what: str = "deviceContent") -> tuple[str, ...]:
    if path != DESIRED_PREFIX and not path.startswith(DESIRED_PREFIX + "."):
        raise BadRequest(f"{what} path {path!r} must start with {DESIRED_PREFIX}", field="content")
    parts = tuple(p for p in path[len(DESIRED_PREFIX) :].split(".") if p)
    return parts


def _content_patch(content: dict[str, Any], what: str = "deviceContent") -> dict[str, Any]:
    """deviceContent, or one module's modulesContent entry (`{"properties.desired.a.b": value}`), as one
    desired merge-patch."""
    patch: dict[str, Any] = {}
    for path, value in content.items():
        parts = _desired_path(path, what)
        if not parts:
            if not isinstance(value, dict):
                raise BadRequest("properties.desired content must be an object", field="content")
            _merge(patch, value)
            continue
        node = patch
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return patch


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _removal(paths: list[list[str]]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for parts in paths:
        node = patch
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            if parts:
                node[parts[-1]] = None
    return patch


def _checked(patch: dict[str, Any], what: str) -> dict[str, Any]:
    """A content patch within the twin's desired-section rules (names, depth, size)."""
    check_size(what, check_section(what, patch), DESIRED_LIMIT)
    return patch


@dataclass(frozen=True, slots=True)
class Rule:
    """A configuration as the reconciler uses it."""

    id: str
    priority: int
    created_ms: int
    target: Query
    patch: dict[str, Any]
    paths: list[list[str]]


def decide(
    doc: dict[str, Any], stored: dict[str, Any], rules: list[Rule]
) -> tuple[dict[str, Any] | None, dict[str, Any]] | None:
    """(desired patch or None, new configurations section) for one twin, None when nothing changes.
    `rules` are ordered winner first (priority, then newest creation)."""
    targeted = [r for r in rules if matches(r.target, doc)]
    previous = next((cid for cid, e in stored.items() if e.get("status") == "Applied"), None)
    section: dict[str, Any] = {r.id: {"status": "Targeted"} for r in targeted}
    patch: dict[str, Any] = {}
    winner = targeted[0] if targeted else None
    if winner is not None and previous == winner.id:
        section[winner.id] = stored[previous]
    else:
        if previous is not None:
            patch = _removal(stored[previous].get("paths", []))
        if winner is not None:
            _merge(patch, winner.patch)
            section[winner.id] = {"status": "Applied", "paths": winner.paths}
    if section == stored and not patch:
        return None
    return (patch or None), section


def _rule(record: ConfigurationRecord) -> Rule:
    doc = record.doc
    content = (doc.get("content") or {}).get("deviceContent") or {}
    paths = [list(_desired_path(p)) for p in content]
    return Rule(
        record.id,
        record.priority,
        record.created_ms,
        parse_condition(doc.get("targetCondition") or "", field="targetCondition"),
        _content_patch(content),
        paths,
    )


def _system_query(condition: str) -> str:
    """Azure's system metric query text (the twin query grammar, not SQL)."""
    where = f" where {condition}" if condition.strip() not in ("", "*") else ""
    return "select deviceId from devices" + where  # noqa: S608


def _order(rules: list[Rule]) -> list[Rule]:
    return sorted(rules, key=lambda r: (-r.priority, -r.created_ms, r.id))


class ConfigurationService:
    def __init__(
        self,
        repo: SqlConfigurationRepository,
        twins: TwinService,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._repo = repo
        self._twins = twins
        self._audit = audit
        self._clock = clock
        self.changed: Callable[[], None] = lambda: None  # the reconciler sweeps

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @staticmethod
    def validate_id(config_id: object) -> str:
        if not isinstance(config_id, str) or not _ID.fullmatch(config_id):
            raise BadRequest(
                "configuration id must be 1-128 letters, digits or -:+%_#*?!(),=@;'.", field="id"
            )
        return config_id

    def _validate(self, config_id: str, body: dict[str, Any]) -> dict[str, Any]:
        given = body.get("id")
        if given not in (None, "", config_id):
            raise BadRequest(f"id {given!r} in the body does not match {config_id!r}", field="id")
        priority = body.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise BadRequest("priority must be a non-negative integer", field="priority")
        condition = body.get("targetCondition") or ""
        if not isinstance(condition, str):
            raise BadRequest("targetCondition must be a string", field="targetCondition")
        parse_condition(condition, field="targetCondition")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 128
            for k, v in labels.items()
        ):
            raise BadRequest("labels must map strings to strings (at most 128 characters)", field="labels")
        content = body.get("content") or {}
        if not isinstance(content, dict):
            raise BadRequest("content must be an object", field="content")
        if content.get("modulesContent") or content.get("moduleContent"):
            raise BadRequest(
                "modulesContent and moduleContent (IoT Edge deployments, module configurations) are not "
                "supported in automatic configurations yet; applyConfigurationContent applies "
                "modulesContent to one device",
                code="NotSupported",
                field="content",
            )
        device_content = content.get("deviceContent") or {}
        if not isinstance(device_content, dict):
            raise BadRequest("content.deviceContent must be an object", field="content.deviceContent")
        patch = _content_patch(device_content)
        _checked(patch, "content.deviceContent")
        queries = (body.get("metrics") or {}).get("queries") or {}
        if not isinstance(queries, dict) or len(queries) > MAX_METRICS:
            raise BadRequest(f"metrics.queries: at most {MAX_METRICS} named queries", field="metrics.queries")
        for name, text in queries.items():
            if not isinstance(text, str):
                raise BadRequest(f"metrics.queries.{name} must be a query string", field="metrics.queries")
            try:
                parse_query(text)
            except BadRequest as exc:
                raise BadRequest(f"metrics.queries.{name}: {exc.message}", field="metrics.queries") from None
        return {
            "id": config_id,
            "schemaVersion": body.get("schemaVersion") or "1.0",
            "labels": labels,
            "content": {"deviceContent": device_content},
            "targetCondition": condition,
            "priority": priority,
            "systemMetrics": {
                "results": {"appliedCount": 0, "targetedCount": 0},
                "queries": {
                    "targetedCount": _system_query(condition),
                    "appliedCount": _system_query(f"configurations.[[{config_id}]].status = 'Applied'"),
                },
            },
            "metrics": {"results": dict.fromkeys(queries, 0), "queries": dict(queries)},
        }

    def render(self, record: ConfigurationRecord) -> dict[str, Any]:
        return {
            **record.doc,
            "id": record.id,
            "etag": record.etag,
            "priority": record.priority,
            "createdTimeUtc": _iso(record.created_ms),
            "lastUpdatedTimeUtc": _iso(record.updated_ms),
        }

    async def put(
        self, config_id: str, body: dict[str, Any], *, if_match: str | None, actor: str
    ) -> tuple[dict[str, Any], bool]:
        """Create (no If-Match) or update; (configuration, created)."""
        self.validate_id(config_id)
        doc = self._validate(config_id, body)
        given, expected = parse_if_match(if_match)
        now = self._now_ms()
        current = await self._repo.get(config_id)
        if not given or current is None:
            if given:
                raise NotFound(
                    f"configuration {config_id} not found", code="ConfigurationNotFound", field="id"
                )
            if len(await self._repo.list(MAX_CONFIGURATIONS + 1)) >= MAX_CONFIGURATIONS:
                raise BadRequest(f"at most {MAX_CONFIGURATIONS} configurations", code="IotHubQuotaExceeded")
            record = ConfigurationRecord(config_id, new_etag(), doc["priority"], now, now, doc)
            await self._repo.insert(record)
            created = True
        else:
            if current.doc.get("content") != doc["content"]:
                raise BadRequest(
                    "content cannot change after a configuration is created; create a new one",
                    code="ArgumentInvalid",
                    field="content",
                )
            doc["systemMetrics"]["results"] = current.doc.get("systemMetrics", {}).get("results", {})
            old = current.doc.get("metrics", {}).get("results", {})
            doc["metrics"]["results"] = {k: old.get(k, 0) for k in doc["metrics"]["queries"]}
            record = ConfigurationRecord(config_id, new_etag(), doc["priority"], current.created_ms, now, doc)
            await self._repo.replace(record, expected)
            created = False
        await self._audit.record(
            "configuration.create" if created else "configuration.update",
            "ok",
            principal=actor,
            target=config_id,
            details={"priority": doc["priority"]},
        )
        self.changed()
        return self.render(record), created

    async def get(self, config_id: str) -> dict[str, Any]:
        record = await self._repo.get(self.validate_id(config_id))
        if record is None:
            raise NotFound(f"configuration {config_id} not found", code="ConfigurationNotFound", field="id")
        return self.render(record)

    async def list_configurations(self, top: int | None) -> list[dict[str, Any]]:
        return [self.render(r) for r in await self._repo.list(top or MAX_CONFIGURATIONS)]

    async def delete(self, config_id: str, *, if_match: str | None, actor: str) -> None:
        _, expected = parse_if_match(if_match)
        await self._repo.delete(self.validate_id(config_id), expected)
        await self._audit.record("configuration.delete", "ok", principal=actor, target=config_id)
        self.changed()

    async def test_queries(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {"targetConditionError": "", "customMetricQueryErrors": {}}
        condition = body.get("targetCondition")
        if condition:
            try:
                parse_condition(str(condition), field="targetCondition")
            except BadRequest as exc:
                result["targetConditionError"] = exc.message
        for name, text in (body.get("customMetricQueries") or {}).items():
            try:
                parse_query(str(text))
            except BadRequest as exc:
                result["customMetricQueryErrors"][name] = exc.message
        return result

    async def apply_content(self, device_id: str, content: dict[str, Any], *, actor: str) -> None:
        """`applyConfigurationContent` (Azure's "set modules" on one device): `deviceContent` goes to the
        device twin and each `modulesContent` entry (`{moduleId: {"properties.desired…": value}}`) to
        that module's twin, as desired merge-patches (null removes a key). Everything is validated, and
        the device and every named module must exist, before anything is written."""
        if not isinstance(content, dict):
            raise BadRequest("body must be a ConfigurationContent object", field="body")
        if content.get("moduleContent"):
            raise BadRequest("moduleContent is for module configurations (FROM devices.modules targets); "
                             "applyConfigurationContent takes deviceContent and modulesContent",
                             field="moduleContent")
        device_content = content.get("deviceContent") or {}
        modules_content = content.get("modulesContent") or {}
        if not isinstance(device_content, dict):
            raise BadRequest("deviceContent must be an object", field="deviceContent")
        if not isinstance(modules_content, dict) or len(modules_content) > MAX_MODULES_CONTENT:
            raise BadRequest(f"modulesContent must map at most {MAX_MODULES_CONTENT} module ids to content",
                             field="modulesContent")
        patches: dict[str | None, dict[str, Any]] = {None: _checked(_content_patch(device_content),
                                                                    "deviceContent")}
        for module_id, module_content in modules_content.items():
            what = f"modulesContent.{module_id}"
            if not isinstance(module_content, dict):
                raise BadRequest(f"{what} must be an object", field="modulesContent")
            patches[module_id] = _checked(_content_patch(module_content, what), what)
        for module_id in patches:  # 404 DeviceNotFound / ModuleNotFound before any write
            await self._twins.get(device_id, module_id)
        for module_id, patch in patches.items():
            if patch:
                await self._twins.patch(device_id, {"properties": {"desired": patch}}, if_match=None,
                                        actor=actor, module_id=module_id)

    async def rules(self) -> list[Rule]:
        rules = []
        for record in await self._repo.list(MAX_CONFIGURATIONS):
            try:
                rules.append(_rule(record))
            except BadRequest:
                log.warning("configuration %s no longer parses; skipped", record.id)
        return _order(rules)

    async def refresh_metrics(self) -> None:
        """Count every configuration's system and user metrics over all twins (one scan)."""
        records = await self._repo.list(MAX_CONFIGURATIONS)
        if not records:
            return
        plans: list[tuple[ConfigurationRecord, Query, Query, dict[str, Query]]] = []
        for r in records:
            try:
                target = parse_condition(r.doc.get("targetCondition") or "", field="targetCondition")
                applied = parse_query(r.doc["systemMetrics"]["queries"]["appliedCount"])
                custom = {n: parse_query(q) for n, q in r.doc.get("metrics", {}).get("queries", {}).items()}
            except (BadRequest, KeyError):
                continue
            plans.append((r, target, applied, custom))
        targeted = dict.fromkeys((r.id for r, _, _, _ in plans), 0)
        applied_n = dict(targeted)
        custom_n = {r.id: dict.fromkeys(c, 0) for r, _, _, c in plans}
        async for doc in matching_twins(self._twins, parse_condition("*")):
            for r, target, applied, custom in plans:
                targeted[r.id] += matches(target, doc)
                applied_n[r.id] += matches(applied, doc)
                for name, query in custom.items():
                    custom_n[r.id][name] += matches(query, doc)
        for r, _, _, _ in plans:
            await self._repo.set_results(
                r.id, {"targetedCount": targeted[r.id], "appliedCount": applied_n[r.id]}, custom_n[r.id]
            )


class ConfigurationReconciler:
    """Keeps every twin's configurations current (see the module docstring)."""

    def __init__(
        self,
        service: ConfigurationService,
        twins: TwinService,
        leadership: Leadership,
        *,
        sweep_interval_s: float,
    ) -> None:
        self._service = service
        self._twins = twins
        self._leadership = leadership
        self._sweep_s = sweep_interval_s
        self._dirty: set[str] = set()
        self._suppress: set[str] = set()
        self._wake = asyncio.Event()
        self._sweep_now = True
        self._task: asyncio.Task[None] | None = None
        twins.add_change_listener(self._on_twin_change)
        service.changed = self.request_sweep

    def _on_twin_change(self, device_id: str, module_id: str | None) -> None:
        if module_id is not None or device_id in self._suppress:  # configurations target device twins
            return
        self._dirty.add(device_id)
        self._wake.set()

    def request_sweep(self) -> None:
        self._sweep_now = True
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="configuration-reconciler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            timeout = max(0.0, next_sweep - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                if self._sweep_now or (loop.time() >= next_sweep and self._leadership.leading):
                    self._sweep_now = False
                    self._dirty.clear()
                    await self.sweep()
                    next_sweep = loop.time() + self._sweep_s
                elif self._dirty:
                    await self.reconcile_dirty()
                elif loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_s
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("configuration reconciliation failed")

    async def _reconcile(self, device_id: str, rules: list[Rule]) -> None:
        self._suppress.add(device_id)
        try:
            await self._twins.configure(
                device_id, lambda doc, stored: decide(doc, stored, rules), actor="hub:configurations"
            )
        finally:
            self._suppress.discard(device_id)

    async def reconcile_dirty(self) -> None:
        devices, self._dirty = self._dirty, set()
        rules = await self._service.rules()
        for device_id in sorted(devices):
            await self._reconcile(device_id, rules)
        await self._service.refresh_metrics()

    async def sweep(self) -> None:
        """Decide every twin again, then count the metrics."""
        rules = await self._service.rules()
        ids = [
            doc["deviceId"]
            async for doc in matching_twins(self._twins, parse_condition("*"))
            if rules or doc.get("configurations")
        ]
        for device_id in ids:
            await self._reconcile(device_id, rules)
        await self._service.refresh_metrics()
