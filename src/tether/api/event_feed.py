"""The consumer API's event JSON and the machinery of its Server-Sent Events feed.

Split from `event_routes.py` (which keeps the handlers). Why the feed is built this way
(docs/performance.md, item 4): under ingest one event-loop turn takes tens of ms, so a feed that moves
100 events per partition per turn falls behind a hub ingesting 10k/s. Each partition reader takes up to
`READ_COUNT` events per read while behind (yielding to the loop between reads), renders them to JSON
itself, and the handler writes everything queued at once. When the backend keeps the properties as JSON
(the embedded log's `read_raw`), that JSON is spliced into the event document instead of being decoded
and encoded again; the document is byte for byte what `json.dumps(event_doc(…))` gives.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import json.encoder
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from aiohttp import web

from tether.api.context import principal_of
from tether.messaging.events import EventData, EventStream, StreamError
from tether.storage.stream.base import RawEvent
from tether.storage.stream.segment import ReadPlan, read_plan

__all__ = ["Chunk", "Feed", "FeedRenderer", "event_doc", "event_json", "iso_time", "raw_event_json", "render"]

log = logging.getLogger("tether.api.events")
_R = TypeVar("_R")
Rendered = tuple[int, int, list[tuple[int, str]]]  # (events read, next sequence, (sequence, JSON) wanted)

READ_COUNT = 1000  # events per read of a partition reader (the long-poll API's maximum too)
READ_SLICE_S = 10.0  # one long-poll read of a feed's partition reader; it loops until the feed stops
WATCH_S = 0.5  # how often a feed looks for client disconnect, shutdown and token expiry
QUEUE_CHUNKS = 8  # chunks (one read each) buffered per feed: a slow client slows its own readers only
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript",
               "application/x-www-form-urlencoded")
_compact = functools.partial(json.dumps, separators=(",", ":"))
_ascii_str = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


@runtime_checkable
class ReadsRaw(Protocol):
    """A stream that can hand out events with their stored property JSON (`LocalEventStream`)."""

    async def read_raw(self, partition: int, *, from_sequence: int = 0, max_count: int = 100,
                       timeout_s: float = 0.0) -> list[RawEvent]: ...


@runtime_checkable
class PlansRaw(Protocol):
    """A stream whose reads another process can do from files (`LocalEventStream.plan_raw`)."""

    async def plan_raw(self, partition: int, *, from_sequence: int = 0, max_count: int = 100,
                       timeout_s: float = 0.0) -> ReadPlan | None: ...


# --- documents ---------------------------------------------------------------------------------------
class _Second:
    """The formatted second of the last `iso_time` call: strftime per event is a measurable cost."""

    second = -1
    text = ""


def iso_time(ms: int) -> str:
    """ISO 8601 UTC with milliseconds, like Azure's `iothub-enqueuedtime`."""
    second, millis = divmod(ms, 1000)
    if second != _Second.second:
        _Second.text = (EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S.")
        _Second.second = second
    return f"{_Second.text}{millis:03d}Z"


@functools.lru_cache(maxsize=256)
def _binary_type(content_type: str, content_encoding: str) -> bool:
    raw_type = content_type.lower()
    ctype = raw_type.split(";")[0].strip()
    if not ctype or "charset=" in raw_type or content_encoding.lower() in ("utf-8", "utf8"):
        return False
    return not (ctype.startswith(_TEXT_TYPES) or ctype.endswith(("+json", "+xml")))


def declared_binary(system: dict[str, str]) -> bool:
    """A non-text content type (without a text encoding) means binary on purpose: such bodies are
    always base64, so whether one happens to decode as UTF-8 cannot change the document's shape."""
    return _binary_type(system.get("content-type", ""), system.get("content-encoding", ""))


def _body(body: bytes, binary: bool) -> str | None:
    """The body as text, or None when it goes out as base64."""
    if not binary:
        try:  # not contextlib.suppress, which costs a third more per binary body (~1 µs of 3.6)
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return None


def event_doc(event: EventData) -> dict[str, Any]:
    """The consumer API's event JSON (az monitor-events-like names)."""
    body = _body(event.body, declared_binary(event.system_properties))
    return {
        "partition": event.partition, "offset": str(event.offset), "sequenceNumber": event.sequence_number,
        "enqueuedTime": iso_time(event.enqueued_time_ms), "deviceId": event.device_id,
        "moduleId": event.module_id, "systemProperties": dict(event.system_properties),
        "properties": dict(event.properties),
        "body": body if body is not None else base64.b64encode(event.body).decode("ascii"),
        "bodyEncoding": "utf-8" if body is not None else "base64",
    }


def event_json(event: EventData) -> str:
    """`event_doc` as compact ASCII-only JSON (line-based SSE parsers may split on U+2028)."""
    return _compact(event_doc(event))


# A key can only match as a key: inside a JSON string every `"` is escaped, and a value is never
# followed by `:`. The stored JSON is flat, one key once (it was a dict).
_CONTENT_TYPE = re.compile(rb'"content-type":"((?:[^"\\]|\\.)*)"')
_CONTENT_ENCODING = re.compile(rb'"content-encoding":"((?:[^"\\]|\\.)*)"')


def _stored_str(pattern: re.Pattern[bytes], stored: bytes) -> str:
    found = pattern.search(stored)
    if found is None:
        return ""
    value = found.group(1)
    return str(json.loads(b'"' + value + b'"')) if b"\\" in value else value.decode("utf-8")


def _ascii_json(stored: bytes) -> str:
    """Stored property JSON as `json.dumps` would write it: the log writes UTF-8 (not \\u-escaped), so
    only an all-ASCII object without DEL (which json.dumps escapes) can be spliced as is."""
    if not stored:
        return "{}"
    if stored.isascii() and b"\x7f" not in stored:
        return stored.decode("ascii")
    return _compact(json.loads(stored))


def raw_event_json(event: RawEvent) -> str:
    """`event_json` of an event read with `read_raw`, without decoding its properties."""
    system = event.system_json
    binary = b'"content-type":' in system and _binary_type(_stored_str(_CONTENT_TYPE, system),
                                                            _stored_str(_CONTENT_ENCODING, system))
    text = _body(event.body, binary)
    if text is None:
        body, encoding = f'"{base64.b64encode(event.body).decode("ascii")}"', "base64"
    else:
        body, encoding = _ascii_str(text), "utf-8"
    module = "null" if event.module_id is None else _ascii_str(event.module_id)
    return (f'{{"partition":{event.partition},"offset":"{event.offset}",'
            f'"sequenceNumber":{event.sequence_number},"enqueuedTime":"{iso_time(event.enqueued_time_ms)}",'
            f'"deviceId":{_ascii_str(event.device_id)},"moduleId":{module},'
            f'"systemProperties":{_ascii_json(system)},"properties":{_ascii_json(event.properties_json)},'
            f'"body":{body},"bodyEncoding":"{encoding}"}}')


def render_events(raw: list[RawEvent], start: int, device: str | None) -> Rendered:
    """The wanted ones of `raw` (all, or one device's) as JSON."""
    if not raw:
        return 0, start, []
    wanted = [(e.sequence_number, raw_event_json(e)) for e in raw if device is None or e.device_id == device]
    return len(raw), raw[-1].sequence_number + 1, wanted


def render_plan(plan: ReadPlan, device: str | None) -> Rendered:
    """In a renderer process: read and render one planned read (nothing when retention deleted a
    segment meanwhile; the feed then plans again from what is left)."""
    try:
        raw = read_plan(plan)
    except FileNotFoundError:
        raw = []
    return render_events(raw, plan.min_seq, device)


def _helper_pid() -> int:
    return os.getpid()  # called by reference: the helper imports this module to run it


def _renderer_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the hub's to handle, not a worker's


class FeedRenderer:
    """Reads and renders feed events in helper processes (`storage.stream_reader_processes`).

    Reading the log back and writing each event's JSON cost the hub ~8 µs per event per feed, a
    quarter of its single core under full ingest (docs/performance.md); a helper process does that
    on another core, and the hub only plans reads (committed file ranges) and writes the result.
    Started at the first feed; a helper that dies is replaced at the next read."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def ready(self) -> None:
        """Spawn the helpers and import this module in them (a second or more on a busy machine)
        before a feed answers, not while its first events pile up."""
        await self._call(_helper_pid)

    async def render(self, plan: ReadPlan, device: str | None) -> Rendered:
        return await self._call(render_plan, plan, device)

    async def _call(self, fn: Callable[..., _R], *args: Any) -> _R:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context,
                                                 initializer=_renderer_init)
            try:
                return await loop.run_in_executor(self._pool, fn, *args)
            except BrokenProcessPool:
                log.warning("event feed renderer process died (attempt %d); starting a new one", attempt)
                self.close()
        raise StreamError("event feed renderer unavailable")

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


# --- the feed ----------------------------------------------------------------------------------------
class Chunk(NamedTuple):
    """Rendered events of one read of one partition: (sequence number, event JSON) each."""

    partition: int
    events: list[tuple[int, str]]


def render(chunks: list[Chunk], positions: dict[int, int]) -> bytes:
    """The SSE text of `chunks`, advancing `positions`. Each event's id holds every partition's resume
    position (`p:next,…` in partition order), so a reconnecting client (EventSource sends
    `Last-Event-ID`) continues exactly after it; only the event's own partition changes within a chunk.
    The JSON is ASCII-only because line-based SSE parsers may split on Unicode line separators."""
    order = sorted(positions)
    out: list[str] = []
    for chunk in chunks:
        p = chunk.partition
        at = order.index(p)
        before = "".join(f"{q}:{positions[q]}," for q in order[:at])
        after = "".join(f",{q}:{positions[q]}" for q in order[at + 1 :])
        head, tail = f"id: {before}{p}:", f"{after}\ndata: "
        out.extend(f"{head}{sequence + 1}{tail}{data}\n\n" for sequence, data in chunk.events)
        positions[p] = chunk.events[-1][0] + 1
    return "".join(out).encode("ascii")


class Feed:
    """One reader task per partition feeding a bounded queue of rendered chunks, plus a watcher:
    aiohttp does not cancel a handler whose client left, so it looks, and also ends the feed at
    shutdown (`closing`) and when the SAS token expires (the client reconnects with a fresh one).
    `reason` says why it stopped."""

    def __init__(self, request: web.Request, stream: EventStream, starts: dict[int, int], device: str | None,
                 closing: asyncio.Event, renderer: FeedRenderer | None = None) -> None:
        self.stream, self.device, self._closing = stream, device, closing
        self._raw = stream if isinstance(stream, ReadsRaw) else None
        # (the stream that plans reads, the helpers that do them) when reads leave the hub process
        self._offload = (stream, renderer) if renderer is not None and isinstance(stream, PlansRaw) else None
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue(QUEUE_CHUNKS)
        self.stop = asyncio.Event()
        self.reason = ""
        self.stopped = asyncio.ensure_future(self.stop.wait())
        self._get: asyncio.Future[Chunk] | None = None
        self._tasks = [asyncio.create_task(self._read(p, s), name=f"tether-feed-p{p}")
                       for p, s in starts.items()]
        self._tasks.append(asyncio.create_task(self._watch(request), name="tether-feed-watch"))

    def end(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    async def _watch(self, request: web.Request) -> None:
        expires_at = principal_of(request).expires_at
        while not self.stop.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                self.end("client disconnected")
            elif self._closing.is_set():
                self.end("hub shutting down")
            elif expires_at is not None and time.time() >= expires_at:
                self.end("token expired")
            else:
                await asyncio.sleep(WATCH_S)

    async def _fetch(self, partition: int, sequence: int) -> Rendered:
        """(events read, next sequence, the wanted ones rendered)."""
        device = self.device
        if self._offload is not None:
            planner, renderer = self._offload
            plan = await planner.plan_raw(partition, from_sequence=sequence, max_count=READ_COUNT,
                                          timeout_s=READ_SLICE_S)
            return (0, sequence, []) if plan is None else await renderer.render(plan, device)
        if self._raw is not None:
            raw = await self._raw.read_raw(partition, from_sequence=sequence, max_count=READ_COUNT,
                                        timeout_s=READ_SLICE_S)
            return render_events(raw, sequence, device)
        events = await self.stream.read(partition, from_sequence=sequence, max_count=READ_COUNT,
                                   timeout_s=READ_SLICE_S)
        if not events:
            return 0, sequence, []
        return len(events), events[-1].sequence_number + 1, [
            (e.sequence_number, event_json(e)) for e in events if device is None or e.device_id == device]

    async def _read(self, partition: int, sequence: int) -> None:
        try:
            while not self.stop.is_set():
                count, sequence, rendered = await self._fetch(partition, sequence)
                if rendered:
                    await self.queue.put(Chunk(partition, rendered))
                if count >= READ_COUNT:
                    await asyncio.sleep(0)  # behind: read on, but let the rest of the hub run first
        except StreamError as exc:
            self.end(f"event stream unavailable: {exc.message}")
        except Exception:  # a bug must end the feed, not leave the client waiting on a dead reader
            log.exception("event feed reader of partition %d failed", partition)
            self.end("internal error")

    async def next_chunks(self, wait_s: float) -> list[Chunk] | None:
        """Everything queued; `[]` when `wait_s` passed idle; None once stopped."""
        if self.stop.is_set():
            return None
        chunks: list[Chunk] = []
        if self.queue.empty() and not (self._get is not None and self._get.done()):
            if self._get is None:
                self._get = asyncio.ensure_future(self.queue.get())
            await asyncio.wait((self._get, self.stopped), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if self.stop.is_set():
                return None
        if self._get is not None and self._get.done():  # it took the oldest chunk: it goes first
            chunks.append(self._get.result())
            self._get = None
        while not self.queue.empty():
            chunks.append(self.queue.get_nowait())
        return chunks

    async def send(self, request: web.Request, response: web.StreamResponse, data: bytes) -> None:
        """Write; if the feed must end while the write waits on a client that stopped reading, drop
        the connection, so neither this handler nor the hub's shutdown waits on it."""
        write = asyncio.ensure_future(response.write(data))
        await asyncio.wait((write, self.stopped), return_when=asyncio.FIRST_COMPLETED)
        if not write.done():
            if request.transport is not None:
                request.transport.abort()
            write.cancel()
            await asyncio.gather(write, return_exceptions=True)
            raise ConnectionError("client stopped reading")
        write.result()

    async def close(self) -> None:
        self.end("closed")
        pending: list[asyncio.Future[Any]] = [*self._tasks, self.stopped, *([self._get] if self._get else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
