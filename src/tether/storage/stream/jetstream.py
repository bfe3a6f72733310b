"""Event stream on NATS JetStream (`nats://` URLs), for hubs that share one stream or want NATS' tooling.

Layout: one JetStream stream per partition (`{stream_name}_P{n}`, subject `{prefix}.p{n}`) so the stream
sequence *is* the partition sequence (JetStream counts from 1; we subtract 1 to stay 0-based like the
embedded log; `offset` is the same number). Payload = the raw body, event metadata in one ASCII JSON
header (`Tether-Event`), so other NATS tools see the device's bytes unchanged. Groups and checkpoints live
in a KV bucket. `append` returns after the PubAck: the server stored the message (whether the server
fsyncs before acking depends on its `sync_interval`; see the decision record).

Reads use ephemeral pull consumers (ack none) kept as cursors keyed by the next sequence, so a consumer
reading forward reuses one server-side consumer. The pull protocol is driven directly (not nats-py's
`fetch`) to get long-poll semantics: return as soon as one event exists, not when the batch is full.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from tether.errors import BadRequest, Conflict, NotFound
from tether.storage.stream.base import (
    DEFAULT_CONSUMER_GROUP,
    EventData,
    StreamError,
    StreamStats,
    check_partition,
    partition_for_device,
    subscribe,
    validate_consumer_group,
)

__all__ = ["JetStreamEventStream"]

log = logging.getLogger(__name__)

META_HEADER = "Tether-Event"
GROUPS_KEY = "groups"
_CURSOR_IDLE_S = 60.0
_CONSUMER_INACTIVE_S = 180.0


class _CursorBroken(Exception):
    """The server-side consumer is gone or did not answer; a fresh cursor is needed."""


class _Cursor:
    """One ephemeral pull consumer plus its reply inbox; used by one read at a time."""

    def __init__(
        self, owner: JetStreamEventStream, partition: int, name: str, sub: Any, next_seq: int
    ) -> None:
        self.owner = owner
        self.partition = partition
        self.name = name
        self.sub = sub
        self.next_seq = next_seq
        self.last_used = time.monotonic()

    async def pull(self, batch: int, wait_s: float | None) -> list[Any]:
        """One pull request, consumed to its end: `batch` messages or the server's 404/408 status."""
        req: dict[str, Any] = {"batch": batch}
        if wait_s:
            req["expires"] = max(1_000_000, int(wait_s * 1e9))
        else:
            req["no_wait"] = True
        nc = self.owner.nc
        stream = self.owner.stream_for(self.partition)
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{self.name}", json.dumps(req).encode(),
                         reply=self.sub.subject)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait_s or 0.0) + self.owner.request_timeout_s
        out: list[Any] = []
        while len(out) < batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _CursorBroken("no answer to a pull request")
            try:
                msg = await self.sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError as exc:
                raise _CursorBroken("no answer to a pull request") from exc
            status = msg.headers.get("Status") if msg.headers and not msg.data else None
            if status is None:
                out.append(msg)
            elif status in ("404", "408"):
                break
            elif status != "100":
                raise _CursorBroken(f"pull failed: {status} {msg.headers.get('Description', '')}")
        self.last_used = time.monotonic()
        return out


class JetStreamEventStream:
    """`EventStream` backed by NATS JetStream (FileStorage, age/size limits per partition stream)."""

    def __init__(
        self,
        url: str,
        partitions: int,
        retention_hours: float,
        retention_bytes: int,
        *,
        stream_name: str = "TETHER_EVENTS",
        subject_prefix: str | None = None,
        kv_bucket: str = "tether_checkpoints",
        request_timeout_s: float = 5.0,
        connect_deadline_s: float = 10.0,
        max_cursors: int = 64,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.url = url
        self.partition_count = partitions
        self.retention_hours = retention_hours
        self.retention_bytes = retention_bytes
        self.stream_name = stream_name
        self.subject_prefix = subject_prefix or stream_name.lower().replace("_", ".")
        self.kv_bucket = kv_bucket
        self.request_timeout_s = request_timeout_s
        self.connect_deadline_s = connect_deadline_s
        self.max_cursors = max_cursors
        self.stats = StreamStats()
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None
        self._closed = False
        self._cursors: OrderedDict[tuple[int, int, str], _Cursor] = OrderedDict()
        self._cleanup: set[asyncio.Task[None]] = set()
        self._last_ms = [0] * partitions

    @property
    def nc(self) -> Any:
        if self._nc is None or self._closed:
            raise StreamError("event stream not started" if self._nc is None else "event stream closed")
        return self._nc

    def stream_for(self, partition: int) -> str:
        return f"{self.stream_name}_P{partition}"

    def subject_for(self, partition: int) -> str:
        return f"{self.subject_prefix}.p{partition}"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._nc is not None:
            return
        # Reconnect forever once running (NATS restarts must not need a hub restart), but give the first
        # connection a deadline: with unlimited attempts nats-py would retry the initial connect forever.
        nc = NATS()
        try:
            await asyncio.wait_for(
                nc.connect(servers=[self.url], connect_timeout=max(1, round(self.request_timeout_s)),
                           max_reconnect_attempts=-1, allow_reconnect=True, name="tether-stream",
                           error_cb=_log_nats_error),
                self.connect_deadline_s,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise StreamError(f"cannot reach NATS at {_redact(self.url)}: {exc!r}") from exc
        self._nc = nc
        self._js = nc.jetstream(timeout=self.request_timeout_s)
        try:
            for n in range(self.partition_count):
                await self._ensure_stream(n)
            try:
                self._kv = await self._js.key_value(self.kv_bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self._js.create_key_value(bucket=self.kv_bucket, history=1,
                                                           storage=api.StorageType.FILE)
        except nats.errors.Error as exc:
            await nc.close()
            self._nc = None
            raise StreamError(f"JetStream set-up failed: {exc}") from exc

    async def _ensure_stream(self, n: int) -> None:
        config = api.StreamConfig(
            name=self.stream_for(n),
            subjects=[self.subject_for(n)],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_age=self.retention_hours * 3600.0,
            max_bytes=self.retention_bytes,
            allow_direct=True,
        )
        try:
            info = await self._js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(config)
            return
        current = info.config
        age_changed = abs((current.max_age or 0) - (config.max_age or 0)) > 1e-3
        if current.max_bytes != config.max_bytes or age_changed:
            await self._js.update_stream(config)

    async def close(self) -> None:
        if self._nc is None or self._closed:
            return
        cursors = list(self._cursors.values())
        self._cursors.clear()
        for cursor in cursors:
            await self._drop(cursor)
        if self._cleanup:
            await asyncio.gather(*self._cleanup, return_exceptions=True)
        self._closed = True
        with contextlib.suppress(nats.errors.Error):
            await self._nc.close()

    async def delete_storage(self) -> None:
        """Delete every stream and the KV bucket this instance uses (tests, `reset` tooling)."""
        js = self._js
        if js is None:
            raise StreamError("event stream not started")
        for n in range(self.partition_count):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(self.stream_for(n))
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_key_value(self.kv_bucket)

    # -- events ---------------------------------------------------------------------------------
    def partition_for(self, device_id: str) -> int:
        return partition_for_device(device_id, self.partition_count)

    async def append(
        self,
        device_id: str,
        body: bytes,
        *,
        module_id: str | None = None,
        properties: Mapping[str, str],
        system_properties: Mapping[str, str],
    ) -> EventData:
        """Publish and wait for the PubAck (the server stored it) before returning."""
        nc = self.nc
        p = self.partition_for(device_id)
        ms = max(int(time.time() * 1000), self._last_ms[p])
        self._last_ms[p] = ms
        sys_props, props = dict(system_properties), dict(properties)
        meta = {"d": device_id, "m": module_id, "s": sys_props, "p": props, "t": ms}
        header = json.dumps(meta, separators=(",", ":"), ensure_ascii=True)
        started = time.perf_counter()
        try:
            ack = await self._js.publish(self.subject_for(p), bytes(body), timeout=self.request_timeout_s,
                                         stream=self.stream_for(p), headers={META_HEADER: header})
        except nats.errors.MaxPayloadError as exc:
            raise BadRequest(f"event too large for NATS (max {nc.max_payload} bytes)") from exc
        except nats.errors.Error as exc:
            self.stats.append_errors += 1
            raise StreamError(f"JetStream publish failed: {exc}") from exc
        self.stats.observe_fsync(time.perf_counter() - started)
        self.stats.observe_batch(1, len(body))
        seq = int(ack.seq) - 1
        return EventData(p, seq, seq, ms, device_id, module_id, sys_props, props, bytes(body))

    def _event(self, partition: int, msg: Any) -> EventData:
        seq = int(msg.metadata.sequence.stream) - 1
        raw = (msg.headers or {}).get(META_HEADER)
        if raw is None:  # published by someone else on our subject: keep it readable
            meta: dict[str, Any] = {"d": "", "m": None, "s": {}, "p": {},
                                    "t": int(msg.metadata.timestamp.timestamp() * 1000)}
        else:
            meta = json.loads(raw)
        return EventData(partition, seq, seq, int(meta["t"]), str(meta["d"]), meta.get("m"),
                         dict(meta.get("s") or {}), dict(meta.get("p") or {}), bytes(msg.data or b""))

    async def read(
        self, partition: int, *, from_sequence: int = 0, max_count: int = 100, timeout_s: float = 0.0
    ) -> list[EventData]:
        """Events with sequence ≥ from_sequence; long-polls up to timeout_s for the first one."""
        check_partition(partition, self.partition_count)
        if max_count < 1:
            raise BadRequest("max_count must be >= 1", field="max_count")
        from_sequence = max(0, from_sequence)
        for attempt in range(2):
            cursor = self._take_cursor(partition, from_sequence) or await self._new_cursor(
                partition, api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                              opt_start_seq=from_sequence + 1), from_sequence)
            try:
                msgs = await cursor.pull(max_count, None)
                if not msgs and timeout_s > 0:
                    msgs = await cursor.pull(1, timeout_s)
                    if msgs and max_count > 1:
                        msgs += await cursor.pull(max_count - 1, None)
            except _CursorBroken as exc:
                await self._drop(cursor)
                if attempt:
                    raise StreamError(f"JetStream read failed: {exc}") from exc
                continue
            except nats.errors.Error as exc:
                await self._drop(cursor)
                raise StreamError(f"JetStream read failed: {exc}") from exc
            events = [self._event(partition, m) for m in msgs]
            if events:
                cursor.next_seq = events[-1].sequence_number + 1
                self.stats.reads += 1
                self.stats.read_events += len(events)
            self._put_cursor(cursor)
            return events
        return []  # pragma: no cover - the loop returns or raises

    def subscribe(self, partition: int, from_sequence: int = 0, *, batch: int = 100,
                  poll_s: float = 30.0) -> AsyncGenerator[EventData, None]:
        return subscribe(self, partition, from_sequence, batch=batch, poll_s=poll_s)

    async def find_sequence_at(self, partition: int, enqueued_time_ms: int) -> int:
        """First sequence stored at or after the time (server timestamps), else the next sequence."""
        check_partition(partition, self.partition_count)
        start = dt.datetime.fromtimestamp(enqueued_time_ms / 1000.0, tz=dt.UTC)
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=start)
        cursor = await self._new_cursor(partition, config, 0)
        try:
            msgs = await cursor.pull(1, None)
        except _CursorBroken as exc:
            raise StreamError(f"JetStream lookup failed: {exc}") from exc
        finally:
            await self._drop(cursor)
        if msgs:
            return int(msgs[0].metadata.sequence.stream) - 1
        return await self.latest_sequence(partition)

    async def latest_sequence(self, partition: int) -> int:
        """The sequence the next append to this partition will get."""
        check_partition(partition, self.partition_count)
        self.nc  # noqa: B018 - raises when closed
        info = await self._js.stream_info(self.stream_for(partition))
        return int(info.state.last_seq)

    # -- cursors --------------------------------------------------------------------------------
    def _take_cursor(self, partition: int, next_seq: int) -> _Cursor | None:
        self._evict_idle()
        for key, cursor in self._cursors.items():
            if key[0] == partition and key[1] == next_seq:
                del self._cursors[key]
                return cursor
        return None

    def _put_cursor(self, cursor: _Cursor) -> None:
        self._cursors[(cursor.partition, cursor.next_seq, cursor.name)] = cursor
        while len(self._cursors) > self.max_cursors:
            _, oldest = self._cursors.popitem(last=False)
            self._drop_later(oldest)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self._cursors.items() if now - c.last_used > _CURSOR_IDLE_S]:
            self._drop_later(self._cursors.pop(key))

    async def _new_cursor(self, partition: int, config: api.ConsumerConfig, next_seq: int) -> _Cursor:
        nc = self.nc
        config.ack_policy = api.AckPolicy.NONE
        config.inactive_threshold = _CONSUMER_INACTIVE_S
        config.mem_storage = True
        config.name = nc._nuid.next().decode()
        sub = await nc.subscribe(nc.new_inbox())
        try:
            await self._js.add_consumer(self.stream_for(partition), config=config)
        except nats.errors.Error as exc:
            await sub.unsubscribe()
            raise StreamError(f"JetStream consumer creation failed: {exc}") from exc
        return _Cursor(self, partition, config.name, sub, next_seq)

    async def _drop(self, cursor: _Cursor) -> None:
        with contextlib.suppress(nats.errors.Error):
            await cursor.sub.unsubscribe()
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await self._js.delete_consumer(self.stream_for(cursor.partition), cursor.name)

    def _drop_later(self, cursor: _Cursor) -> None:
        task = asyncio.get_running_loop().create_task(self._drop(cursor))
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    # -- consumer groups and checkpoints (KV) ---------------------------------------------------
    async def _groups(self) -> tuple[list[str], int | None]:
        self.nc  # noqa: B018 - raises when closed
        try:
            entry = await self._kv.get(GROUPS_KEY)
        except nats.js.errors.KeyNotFoundError:
            return [], None
        return [str(g) for g in json.loads(entry.value or b"[]")], int(entry.revision)

    async def _store_groups(self, groups: list[str], revision: int | None) -> bool:
        value = json.dumps(sorted(groups)).encode()
        try:
            if revision is None:
                await self._kv.create(GROUPS_KEY, value)
            else:
                await self._kv.update(GROUPS_KEY, value, last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyValueError):
            return False  # someone else changed the list meanwhile: re-read and retry
        return True

    async def consumer_groups(self) -> list[str]:
        groups, _ = await self._groups()
        return [DEFAULT_CONSUMER_GROUP, *sorted(groups)]

    async def create_consumer_group(self, name: str) -> None:
        validate_consumer_group(name)
        for _ in range(10):
            groups, revision = await self._groups()
            if name == DEFAULT_CONSUMER_GROUP or name in groups:
                raise Conflict(f"consumer group {name!r} already exists", code="ConsumerGroupAlreadyExists")
            if await self._store_groups([*groups, name], revision):
                return
        raise StreamError("consumer group list kept changing; try again")

    async def delete_consumer_group(self, name: str) -> None:
        if name == DEFAULT_CONSUMER_GROUP:
            raise BadRequest(
                "the $Default consumer group cannot be deleted", code="ConsumerGroupNotDeletable"
            )
        for _ in range(10):
            groups, revision = await self._groups()
            if name not in groups:
                raise NotFound(f"consumer group {name!r} not found", code="ConsumerGroupNotFound")
            if await self._store_groups([g for g in groups if g != name], revision):
                for p in range(self.partition_count):
                    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                        await self._kv.purge(_cp_key(name, p))
                return
        raise StreamError("consumer group list kept changing; try again")

    async def _require_group(self, group: str, partition: int) -> None:
        check_partition(partition, self.partition_count)
        if group != DEFAULT_CONSUMER_GROUP and group not in (await self._groups())[0]:
            raise NotFound(f"consumer group {group!r} not found", code="ConsumerGroupNotFound")

    async def checkpoint(self, group: str, partition: int, sequence_number: int) -> None:
        if sequence_number < 0:
            raise BadRequest("sequence_number must be >= 0", field="sequence_number")
        await self._require_group(group, partition)
        try:
            await self._kv.put(_cp_key(group, partition), str(sequence_number).encode())
        except nats.errors.Error as exc:
            raise StreamError(f"checkpoint failed: {exc}") from exc

    async def get_checkpoint(self, group: str, partition: int) -> int | None:
        await self._require_group(group, partition)
        try:
            entry = await self._kv.get(_cp_key(group, partition))
        except nats.js.errors.KeyNotFoundError:
            return None
        return int(entry.value)


def _cp_key(group: str, partition: int) -> str:
    """KV keys allow `[-/_=.a-zA-Z0-9]`; `$Default` does not fit, so names are base64url-encoded."""
    encoded = base64.urlsafe_b64encode(group.encode()).decode().rstrip("=")
    return f"cp.{encoded}.{partition}"


async def _log_nats_error(exc: Exception) -> None:
    log.warning("event stream: NATS error: %r", exc)


def _redact(url: str) -> str:
    """Never log NATS credentials embedded in the URL."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
