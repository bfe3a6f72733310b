"""Embedded event stream: one append-only segment log per partition, group-committed with fsync.

Why a hand-written log (see docs/decisions/0004-event-stream.md): telemetry is append-only and read
sequentially, so a log file with CRC framing is the whole storage engine; group commit turns many
concurrent device publishes into one write + one fsync, and crash recovery is "drop the torn tail".

Concurrency: all bookkeeping runs on the event loop; blocking I/O (write+fsync, index scans, unlinks)
runs in worker threads. One writer task per partition takes every pending append, writes them with one
pwrite and one fsync while new appends queue up for the next batch, then resolves their futures.
Readers only ever see committed (fsynced) bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import NamedTuple, TypeVar

from tether.errors import BadRequest
from tether.storage.stream.base import (
    EncodedProperties,
    EventData,
    RawEvent,
    StreamError,
    StreamStats,
    check_partition,
    partition_for_device,
    subscribe,
)
from tether.storage.stream.checkpoints import LocalCheckpointStore, write_json_atomic
from tether.storage.stream.diskio import (
    Create,
    FsyncFailed,
    Recovered,
    Write,
    recover,
    scan_path,
    unlink_all,
    write_batch,
)
from tether.storage.stream.segment import (
    HEADER_SIZE,
    PreparedEvent,
    ReadPlan,
    Record,
    Segment,
    SegmentSlice,
    SparseIndex,
    encode_header,
    fsync_dir,
    read_plan,
    read_records,
    segment_name,
)

if sys.platform != "win32":
    import fcntl

__all__ = ["LocalEventStream"]

log = logging.getLogger(__name__)

MAX_READ_BYTES = 4 << 20  # one read() answer stays below this (but always holds one event)
DEFAULT_SEGMENT_MAX = 64 << 20
PARTITION_CACHE = 1 << 16  # device ids whose partition is remembered (cleared when full)

_T = TypeVar("_T", EventData, RawEvent, ReadPlan)


class _Pending(NamedTuple):
    event: PreparedEvent
    future: asyncio.Future[EventData] | None  # None: a later event of the same group carries it


class _Partition:
    """State of one partition; every field is touched only on the event loop."""

    def __init__(self, stream: LocalEventStream, number: int, recovered: Recovered) -> None:
        self.stream = stream
        self.number = number
        self.directory = stream.directory / f"p{number}"
        self.segments = recovered.segments
        self.first_seqs = [s.first_seq for s in self.segments]
        self.next_seq = recovered.next_seq  # committed
        self.last_time = recovered.last_time
        self.write_fd = recovered.write_fd
        self.pending: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.changed = asyncio.Event()
        self.failed: str | None = None
        self.writer: asyncio.Task[None] | None = None

    # -- writing --------------------------------------------------------------------------------
    async def run_writer(self) -> None:
        while True:
            if not self.pending:
                if self.stream.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch, self.pending = self.pending, []
            if self.failed is not None:
                self._fail(batch, StreamError(self.failed))
                continue
            try:
                await self._commit(batch)
            except Exception as exc:  # a bug must not leave appenders waiting forever
                log.exception("event log: writer of partition %d failed", self.number)
                self.failed = f"partition {self.number} failed: {exc!r}; restart the hub"
                self._fail(batch, StreamError(self.failed))

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        self.stream.stats.append_errors += len(batch)
        for item in batch:
            if item.future is not None and not item.future.done():
                item.future.set_exception(exc)

    async def _commit(self, batch: list[_Pending]) -> None:
        stream = self.stream
        active = self.segments[-1]
        seq = self.next_seq
        ms = max(int(stream.now() * 1000), self.last_time)
        ops: list[Create | Write] = []
        notes: list[tuple[Segment, int, int]] = []  # (segment, seq, position) per event
        settled: list[tuple[asyncio.Future[EventData], EventData]] = []  # resolved once durable
        new_segments: list[Segment] = []
        cur, size, chunk, chunk_at = active, active.size, list[bytes](), active.size
        for item in batch:
            ev = item.event
            if size > HEADER_SIZE and size + ev.frame_size > stream.segment_bytes:
                ops.append(Write(cur, chunk_at, b"".join(chunk)))
                path = self.directory / segment_name(seq)
                nxt = Segment(path, seq, cur.base_offset + size, ms, HEADER_SIZE, index=SparseIndex())
                ops.append(Create(nxt, encode_header(seq, nxt.base_offset, ms)))
                new_segments.append(nxt)
                cur, size, chunk, chunk_at = nxt, HEADER_SIZE, [], HEADER_SIZE
            data = ev.encode(seq, ms)
            chunk.append(data)
            notes.append((cur, seq, size))
            if item.future is not None:  # a group's future is carried by its last event
                settled.append((item.future, EventData(
                    self.number, cur.base_offset + size, seq, ms, ev.device_id, ev.module_id,
                    ev.system_properties, ev.properties, ev.body)))
            size += len(data)
            seq += 1
        ops.append(Write(cur, chunk_at, b"".join(chunk)))
        try:
            fd, fsync_s, created = await asyncio.to_thread(write_batch, ops, self.write_fd, self.directory)
        except FsyncFailed as exc:
            self.failed = f"partition {self.number} failed: fsync error ({exc.__cause__}); restart the hub"
            log.error("event log: %s", self.failed)
            self._fail(batch, StreamError(self.failed))
            return
        except OSError as exc:
            await self._undo(new_segments, exc)
            self._fail(batch, StreamError(f"event log write failed: {exc.strerror}"))
            return
        # Committed: publish sizes, segments and indexes, then wake readers and appenders.
        if created:
            os.close(self.write_fd)
            self.write_fd = fd
            for seg in new_segments:
                self.segments.append(seg)
                self.first_seqs.append(seg.first_seq)
        sizes: dict[int, int] = {}
        for op in ops:
            if isinstance(op, Write):
                sizes[id(op.segment)] = op.position + len(op.data)
        for seg in (active, *new_segments):
            seg.size = sizes.get(id(seg), seg.size)
        for (seg, s, pos) in notes:
            if seg.index is not None:
                seg.index.note(s, pos, ms)
            if seg.first_time is None:
                seg.first_time = ms
        self.next_seq = seq
        self.last_time = ms
        stream.stats.observe_batch(len(batch), sum(len(op.data) for op in ops if isinstance(op, Write)))
        stream.stats.observe_fsync(fsync_s)
        stream.stats.segments_rolled += len(new_segments)
        self.notify()
        for future, result in settled:
            if not future.done():
                future.set_result(result)

    async def _undo(self, new_segments: list[Segment], exc: OSError) -> None:
        """A write failed (e.g. disk full): cut the partial batch so the log stays clean, or give up."""
        log.error("event log: write failed on partition %d: %s", self.number, exc)

        def undo() -> None:
            os.ftruncate(self.write_fd, self.segments[-1].size)
            for seg in new_segments:
                seg.path.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(undo)
        except OSError as undo_exc:
            self.failed = f"partition {self.number} failed: cannot undo a failed write ({undo_exc})"

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    # -- reading --------------------------------------------------------------------------------
    @property
    def first_available(self) -> int:
        return self.segments[0].first_seq

    async def ensure_index(self, seg: Segment) -> SparseIndex:
        if seg.index is None:
            result = await asyncio.to_thread(scan_path, seg.path, seg.first_seq, seg.size)
            if result.valid_end != seg.size:
                raise StreamError(f"corrupt sealed segment {seg.path}", code="StreamCorrupted")
            seg.index = result.sparse
        return seg.index

    async def read(self, from_seq: int, max_count: int) -> list[EventData]:
        return await self._read(from_seq, max_count, self._events_from)

    async def read_raw(self, from_seq: int, max_count: int) -> list[RawEvent]:
        return await self._read(from_seq, max_count, self._raw_from)

    async def _read(self, from_seq: int, max_count: int,
                    take: Callable[[int, int, int, int], list[_T]]) -> list[_T]:
        for _ in range(3):  # retention may delete the segment while its index loads: start over
            start = max(from_seq, self.first_available)
            i = bisect_right(self.first_seqs, start) - 1
            seg = self.segments[i]
            pos = HEADER_SIZE
            if start > seg.first_seq:
                try:
                    index = await self.ensure_index(seg)
                except FileNotFoundError:
                    continue
                if seg not in self.segments:
                    continue
                i = self.segments.index(seg)
                pos = index.position_for_seq(start)
            return take(i, pos, start, max_count)
        return []

    def _events_from(self, i: int, pos: int, start: int, max_count: int) -> list[EventData]:
        out: list[EventData] = []
        budget = MAX_READ_BYTES
        while i < len(self.segments) and len(out) < max_count and budget > 0:
            seg = self.segments[i]
            records = read_records(seg.fd(), pos, seg.size, min_seq=start, max_count=max_count - len(out),
                                   max_bytes=budget)
            for r in records:
                out.append(self._event(seg, r))
                budget -= len(r.body) + 64
            i += 1
            pos = HEADER_SIZE
        return out

    def _raw_from(self, i: int, pos: int, start: int, max_count: int) -> list[RawEvent]:
        plan = self._plan_from(i, pos, start, max_count)[0]
        by_path = {str(seg.path): seg for seg in self.segments[i:]}
        return read_plan(plan, lambda piece: by_path[piece.path].fd())

    def _plan_from(self, i: int, pos: int, start: int, max_count: int) -> list[ReadPlan]:
        slices = tuple(SegmentSlice(str(seg.path), pos if k == i else HEADER_SIZE, seg.size, seg.base_offset)
                       for k, seg in enumerate(self.segments[i:], start=i))
        return [ReadPlan(self.number, slices, start, max_count, MAX_READ_BYTES)]

    async def plan(self, from_seq: int, max_count: int) -> list[ReadPlan]:
        return await self._read(from_seq, max_count, self._plan_from)

    def _event(self, seg: Segment, r: Record) -> EventData:
        return EventData(self.number, seg.base_offset + r.position, r.sequence, r.enqueued_ms, r.device_id,
                         r.module_id, r.system_properties, r.properties, r.body)

    async def find_sequence_at(self, ms: int) -> int:
        for _ in range(3):  # retention may delete the segment being searched: look again
            with contextlib.suppress(FileNotFoundError):
                return await self._find_sequence_at(ms)
        return self.first_available

    async def _find_sequence_at(self, ms: int) -> int:
        if self.next_seq == self.first_available or ms > self.last_time:
            return self.next_seq
        with_records = [(s.first_time, s) for s in self.segments if s.first_time is not None]
        j = bisect_left([t for t, _ in with_records], ms) - 1
        if j < 0:
            return self.first_available
        seg = with_records[j][1]
        index = await self.ensure_index(seg)
        found = read_records(seg.fd(), index.position_before_time(ms), seg.size, min_seq=0,
                             max_count=1, max_bytes=MAX_READ_BYTES, min_time=ms)
        if found:
            return found[0].sequence
        return with_records[j + 1][1].first_seq if j + 1 < len(with_records) else self.next_seq

    # -- retention ------------------------------------------------------------------------------
    def retention_victims(self, now_ms: int) -> list[Segment]:
        """Oldest sealed segments over the byte budget or wholly older than the age limit."""
        stream = self.stream
        total = sum(s.size for s in self.segments)
        cutoff = now_ms - stream.retention_ms
        victims: list[Segment] = []
        for i, seg in enumerate(self.segments[:-1]):
            nxt = self.segments[i + 1]
            newest_bound = nxt.first_time if nxt.first_time is not None else nxt.created_ms
            if total > stream.retention_bytes or newest_bound < cutoff:
                victims.append(seg)
                total -= seg.size
            else:
                break
        del self.segments[: len(victims)]
        del self.first_seqs[: len(victims)]
        for seg in victims:
            seg.close()
        return victims

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        with contextlib.suppress(OSError):
            os.close(self.write_fd)
        self.notify()


class LocalEventStream:
    """`EventStream` on the local disk (`file://` URLs). One process per directory (a lock file says so)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        partitions: int,
        retention_hours: float,
        retention_bytes: int,
        *,
        segment_bytes: int | None = None,
        retention_interval_s: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.directory = Path(directory)
        self.partition_count = partitions
        self.retention_ms = int(retention_hours * 3_600_000)
        self.retention_bytes = retention_bytes
        self.segment_bytes = segment_bytes or max(64 << 10, min(DEFAULT_SEGMENT_MAX, retention_bytes // 8))
        self.retention_interval_s = retention_interval_s
        self.now = now
        self.stats = StreamStats()
        self.closing = False
        self._started = False
        self._partitions: list[_Partition] = []
        self._checkpoints = LocalCheckpointStore(self.directory, partitions)
        self._lock_fd: int | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._partition_of: dict[str, int] = {}  # crc32 per message was 0.3 s of an 8 s ingest profile

    async def start(self) -> None:
        if self._started:
            return
        await asyncio.to_thread(self._open_directory)
        now_ms = int(self.now() * 1000)
        try:
            for n in range(self.partition_count):
                recovered = await asyncio.to_thread(recover, self.directory / f"p{n}", now_ms)
                self.stats.recovered_truncated_bytes += recovered.truncated
                self._partitions.append(_Partition(self, n, recovered))
            await asyncio.to_thread(self._checkpoints.load)
        except BaseException:
            for p in self._partitions:
                p.close()
            self._release_lock()
            raise
        self._started = True
        await self.apply_retention()
        for p in self._partitions:
            p.writer = asyncio.create_task(p.run_writer(), name=f"tether-stream-writer-p{p.number}")
        self._retention_task = asyncio.create_task(self._retention_loop(), name="tether-stream-retention")

    def _open_directory(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            fsync_dir(self.directory.parent)  # the new directory's own entry must survive a crash too
        if sys.platform != "win32":
            fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                raise StreamError(f"event stream {self.directory} is open in another process") from exc
            self._lock_fd = fd
        meta_path = self.directory / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_bytes())
            if int(meta.get("partitions", 0)) != self.partition_count:
                self._release_lock()
                raise StreamError(
                    f"event stream {self.directory} has {meta.get('partitions')} partitions, settings say "
                    f"{self.partition_count}; device→partition mapping would change (move the directory away "
                    "to start a new stream)",
                    code="StreamPartitionMismatch",
                )
        else:
            write_json_atomic(meta_path, {"format": 1, "partitions": self.partition_count})

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        """Stop taking appends, finish the queued ones, wake long-polling readers (they get StreamError)."""
        if not self._started or self.closing:
            return
        self.closing = True
        for p in self._partitions:
            p.wakeup.set()
        await asyncio.gather(*(p.writer for p in self._partitions if p.writer), return_exceptions=True)
        if self._retention_task is not None:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        for p in self._partitions:
            p.close()
        self._release_lock()

    def _check_open(self) -> None:
        if not self._started:
            raise StreamError("event stream not started")
        if self.closing:
            raise StreamError("event stream closed")

    def partition_for(self, device_id: str) -> int:
        partition = self._partition_of.get(device_id)
        if partition is None:
            if len(self._partition_of) >= PARTITION_CACHE:
                self._partition_of.clear()
            partition = self._partition_of[device_id] = partition_for_device(device_id, self.partition_count)
        return partition

    async def append(
        self,
        device_id: str,
        body: bytes,
        *,
        module_id: str | None = None,
        properties: Mapping[str, str],
        system_properties: Mapping[str, str],
    ) -> EventData:
        """Queue the event for the partition's next group commit; returns once it is fsynced."""
        return await self.append_nowait(device_id, body, module_id=module_id, properties=properties,
                                        system_properties=system_properties)

    def append_nowait(
        self,
        device_id: str,
        body: bytes,
        *,
        module_id: str | None = None,
        properties: Mapping[str, str],
        system_properties: Mapping[str, str],
        join: asyncio.Future[EventData] | None = None,
    ) -> asyncio.Future[EventData]:
        """`append` without a coroutine: queues the event now (refusals raise here) and returns the
        future that resolves once it is fsynced. Lets a protocol session skip a Task per message.
        `join`: a future this method returned on the same loop turn for the same device; while its
        events are still queued the new event joins that group and `join` itself is returned (it
        resolves once all of them are durable, with the last one's EventData): one future and one
        callback per read of a connection instead of per message."""
        self._check_open()
        p = self._partitions[self.partition_for(device_id)]
        if p.failed is not None:
            raise StreamError(p.failed)
        system_json = system_properties.encoded if type(system_properties) is EncodedProperties else None
        try:
            event = PreparedEvent.build(device_id, module_id, dict(system_properties), dict(properties),
                                        bytes(body), system_json=system_json)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        pending = p.pending
        if join is not None and pending and pending[-1].future is join:  # still queued: extend the group
            pending[-1] = _Pending(pending[-1].event, None)
            pending.append(_Pending(event, join))
            return join
        future: asyncio.Future[EventData] = asyncio.get_running_loop().create_future()
        pending.append(_Pending(event, future))
        p.wakeup.set()
        return future

    async def read(
        self, partition: int, *, from_sequence: int = 0, max_count: int = 100, timeout_s: float = 0.0
    ) -> list[EventData]:
        """Events with sequence ≥ from_sequence (from the earliest kept one if those expired)."""
        return await self._poll(partition, from_sequence, max_count, timeout_s, _Partition.read)

    async def read_raw(
        self, partition: int, *, from_sequence: int = 0, max_count: int = 100, timeout_s: float = 0.0
    ) -> list[RawEvent]:
        """`read`, with the properties as their stored JSON (for consumers that splice it)."""
        return await self._poll(partition, from_sequence, max_count, timeout_s, _Partition.read_raw)

    async def plan_raw(
        self, partition: int, *, from_sequence: int = 0, max_count: int = 100, timeout_s: float = 0.0
    ) -> ReadPlan | None:
        """`read_raw` resolved to committed file ranges, for a reader in another process
        (`segment.read_plan`); None when nothing arrived within `timeout_s`."""
        plans = await self._poll(partition, from_sequence, max_count, timeout_s, _Partition.plan, count=False)
        return plans[0] if plans else None

    async def _poll(self, partition: int, from_sequence: int, max_count: int, timeout_s: float,
                    fetch: Callable[[_Partition, int, int], Awaitable[list[_T]]], *, count: bool = True
                    ) -> list[_T]:
        check_partition(partition, self.partition_count)
        if max_count < 1:
            raise BadRequest("max_count must be >= 1", field="max_count")
        self._check_open()
        p = self._partitions[partition]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self._check_open()
            if from_sequence < p.next_seq:
                events = await fetch(p, from_sequence, max_count)
                if events:
                    if count:
                        self.stats.reads += 1
                        self.stats.read_events += len(events)
                    return events
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(p.changed.wait(), remaining)
            except TimeoutError:
                return []

    def subscribe(self, partition: int, from_sequence: int = 0, *, batch: int = 100,
                  poll_s: float = 30.0) -> AsyncGenerator[EventData, None]:
        return subscribe(self, partition, from_sequence, batch=batch, poll_s=poll_s)

    async def find_sequence_at(self, partition: int, enqueued_time_ms: int) -> int:
        """First sequence enqueued at or after the time; the next sequence when there is none yet."""
        check_partition(partition, self.partition_count)
        self._check_open()
        return await self._partitions[partition].find_sequence_at(enqueued_time_ms)

    async def latest_sequence(self, partition: int) -> int:
        """The sequence the next append to this partition will get (for "start at end" readers)."""
        check_partition(partition, self.partition_count)
        self._check_open()
        return self._partitions[partition].next_seq

    # -- retention ------------------------------------------------------------------------------
    async def apply_retention(self) -> int:
        """Delete whole sealed segments past the age or size limit; returns how many were deleted."""
        now_ms = int(self.now() * 1000)
        victims = [seg for p in self._partitions for seg in p.retention_victims(now_ms)]
        if victims:
            await asyncio.to_thread(unlink_all, [seg.path for seg in victims])
            self.stats.segments_deleted += len(victims)
            log.info("event log: retention deleted %d segment(s)", len(victims))
        return len(victims)

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retention_interval_s)
            try:
                await self.apply_retention()
            except OSError:
                log.exception("event log: retention failed")

    # -- consumer groups and checkpoints --------------------------------------------------------
    async def consumer_groups(self) -> list[str]:
        return await self._checkpoints.consumer_groups()

    async def create_consumer_group(self, name: str) -> None:
        self._check_open()
        await self._checkpoints.create_consumer_group(name)

    async def delete_consumer_group(self, name: str) -> None:
        self._check_open()
        await self._checkpoints.delete_consumer_group(name)

    async def checkpoint(self, group: str, partition: int, sequence_number: int) -> None:
        self._check_open()
        await self._checkpoints.checkpoint(group, partition, sequence_number)

    async def get_checkpoint(self, group: str, partition: int) -> int | None:
        return await self._checkpoints.get_checkpoint(group, partition)
