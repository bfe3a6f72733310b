"""`tether monitor`: print live telemetry like `az iot hub monitor-events --properties all`.

Local mode reads the hub's event stream directly: every partition is followed concurrently with
long-poll reads. Remote mode (`--hub-url`) follows the hub's Server-Sent Events feed
(`GET /tether/events/stream`, ServiceConnect). The embedded file stream admits one process, so when a
hub runs on the data dir, `CliState.backend()` hands out that hub's API and monitor follows its feed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tether.cli.context import run, state_of
from tether.cli.output import echo_json
from tether.config import ConfigError, Settings
from tether.errors import NotFound, TetherError

if TYPE_CHECKING:
    import httpx

    from tether.cli.remote import RemoteBackend
    from tether.messaging.events import EventData, EventStream

POLL_S = 1.0
BATCH = 100
ANNOTATION_PREFIXES = ("iothub-", "x-opt-")
STREAM_PATH = "/tether/events/stream"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # the hub sends a heartbeat every 15 s, so silence this long means it is gone


def _payload(event: EventData) -> tuple[Any, str | None]:
    """JSON bodies as objects, text as a string, anything else base64 (with the encoding named)."""
    try:
        text = event.body.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(event.body).decode("ascii"), "base64"
    try:
        return json.loads(text), None
    except ValueError:
        return text, None


def event_json(event: EventData) -> dict[str, Any]:
    """The `az iot hub monitor-events` shape: origin, payload, system/application properties and the
    Event Hubs annotations (enqueued time, partition, sequence number, offset)."""
    payload, encoding = _payload(event)
    system = {k: v for k, v in event.system_properties.items() if not k.startswith(ANNOTATION_PREFIXES)}
    annotations: dict[str, Any] = {
        k: v for k, v in event.system_properties.items() if k.startswith(ANNOTATION_PREFIXES)
    }
    annotations.setdefault("iothub-connection-device-id", event.device_id)
    if event.module_id:
        annotations.setdefault("iothub-connection-module-id", event.module_id)
    annotations.setdefault("iothub-message-source", "Telemetry")
    annotations.setdefault("iothub-enqueuedtime", event.enqueued_time_ms)
    annotations.update(
        {
            "x-opt-enqueued-time": event.enqueued_time_ms,
            "x-opt-sequence-number": event.sequence_number,
            "x-opt-offset": str(event.offset),
            "x-opt-partition-id": str(event.partition),
        }
    )
    body: dict[str, Any] = {
        "origin": event.device_id,
        "module": event.module_id or "",
        "payload": payload,
    }
    if encoding:
        body["payload_encoding"] = encoding
    body["annotations"] = annotations
    body["properties"] = {"system": system, "application": dict(event.properties)}
    return {"event": body}


def event_from_doc(doc: dict[str, Any]) -> EventData:
    """An event of the hub's consumer API (`event_routes.event_doc`) back as `EventData`."""
    from tether.messaging.events import EventData

    try:
        raw = doc["body"]
        body = base64.b64decode(raw) if doc.get("bodyEncoding") == "base64" else raw.encode("utf-8")
        enqueued = datetime.fromisoformat(doc["enqueuedTime"].replace("Z", "+00:00"))
        epoch = datetime.fromtimestamp(0, enqueued.tzinfo)
        return EventData(
            partition=int(doc["partition"]), offset=int(doc["offset"]),
            sequence_number=int(doc["sequenceNumber"]),
            enqueued_time_ms=(enqueued - epoch) // timedelta(milliseconds=1),
            device_id=str(doc["deviceId"]), module_id=doc.get("moduleId"),
            system_properties=dict(doc.get("systemProperties") or {}),
            properties=dict(doc.get("properties") or {}), body=body,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TetherError(f"the hub sent an event this CLI cannot read: {exc!r}") from None


class _Printer:
    """Shared stop conditions across the partition readers."""

    def __init__(self, max_events: int | None, compact: bool) -> None:
        self.remaining = max_events
        self.compact = compact
        self.done = asyncio.Event()
        self.last_event = time.monotonic()

    def emit(self, event: EventData) -> None:
        if self.done.is_set():
            return
        echo_json(event_json(event), compact=self.compact)
        self.last_event = time.monotonic()
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.done.set()


@dataclass(frozen=True)
class _Options:
    device: str | None
    consumer_group: str
    from_start: bool
    max_events: int | None
    timeout: float
    compact: bool


# --- local mode ----------------------------------------------------------------------------------
async def _follow(
    stream: EventStream, partition: int, start: int, device: str | None, printer: _Printer
) -> None:
    seq = start
    while not printer.done.is_set():
        events = await stream.read(partition, from_sequence=seq, max_count=BATCH, timeout_s=POLL_S)
        for event in events:
            seq = event.sequence_number + 1
            if device is None or event.device_id == device:
                printer.emit(event)


async def _watch_idle(printer: _Printer, timeout_s: float) -> None:
    while not printer.done.is_set():
        idle = time.monotonic() - printer.last_event
        if idle >= timeout_s:
            printer.done.set()
            return
        await asyncio.sleep(min(timeout_s - idle, POLL_S))


async def _monitor_stream(stream: EventStream, opts: _Options) -> None:
    if opts.consumer_group not in await stream.consumer_groups():
        raise NotFound(f"consumer group {opts.consumer_group!r} does not exist", code="NotFound")
    device = opts.device
    partitions = [stream.partition_for(device)] if device is not None else list(range(stream.partition_count))
    now_ms = int(time.time() * 1000)
    starts = {p: 0 if opts.from_start else await stream.find_sequence_at(p, now_ms) for p in partitions}
    printer = _Printer(opts.max_events, opts.compact)
    tasks = [asyncio.create_task(_follow(stream, p, starts[p], device, printer)) for p in partitions]
    if opts.timeout > 0:
        tasks.append(asyncio.create_task(_watch_idle(printer, opts.timeout)))
    waiter = asyncio.create_task(printer.done.wait())
    try:
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in [*tasks, waiter]:
            task.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)


async def _monitor_local(settings: Settings, opts: _Options) -> None:
    from tether.messaging.events import StreamError, open_stream

    try:
        stream = open_stream(
            settings.stream_url,
            partitions=settings.storage.stream_partitions,
            retention_hours=settings.storage.stream_retention_hours,
            retention_bytes=settings.storage.stream_retention_bytes,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid setting storage.stream_url: {exc}") from None
    try:
        await stream.start()
    except StreamError as exc:
        if "another process" not in exc.message:
            raise
        # `CliState.backend()` found it free a moment ago: a hub (or monitor) has just opened it.
        raise StreamError(f"{exc.message}: it was taken just now; run monitor again to follow the hub "
                          "that holds it") from None
    try:
        await _monitor_stream(stream, opts)
    finally:
        await stream.close()


# --- remote mode ---------------------------------------------------------------------------------
async def _sse_data(lines: AsyncIterator[str], closing: list[str]) -> AsyncIterator[str]:
    """The `data` of each Server-Sent Event; comments (heartbeats) and other fields are skipped, but
    the hub's `: closing: {reason}` is kept in `closing`."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith(": closing:"):
            closing.append(line.removeprefix(": closing:").strip())
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)


def _stream_error(response: httpx.Response) -> TetherError:
    from tether.cli.remote import error_from_response

    error = error_from_response(response)
    if response.status_code == 404 and error.message.startswith("no route"):
        return TetherError("this hub has no telemetry feed (GET /tether/events/stream); update it, or run "
                           "monitor in local mode on the hub host")
    return error


async def _monitor_remote(backend: RemoteBackend, opts: _Options) -> None:
    """Follow the hub's SSE feed; `backend` is open and is closed here."""
    import httpx

    params = {"consumerGroup": opts.consumer_group, "from": "start" if opts.from_start else "end"}
    if opts.device is not None:
        params["device"] = opts.device
    printer = _Printer(opts.max_events, opts.compact)
    timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
    try:
        async with backend.client.stream("GET", STREAM_PATH, params=params, timeout=timeout,
                                         headers={"Accept": "text/event-stream"}) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _stream_error(response)
            closing: list[str] = []
            events = _sse_data(response.aiter_lines(), closing)
            while not printer.done.is_set():
                wait = None if opts.timeout <= 0 else opts.timeout - (time.monotonic() - printer.last_event)
                if wait is not None and wait <= 0:
                    return
                try:
                    data = await asyncio.wait_for(anext(events), wait)
                except TimeoutError:
                    return
                except StopAsyncIteration:
                    reason = ", ".join(closing) or "no reason given"
                    raise TetherError(f"the hub ended the feed: {reason}") from None
                printer.emit(event_from_doc(json.loads(data)))
    finally:
        await backend.close()


def monitor_command(
    ctx: typer.Context,
    device: Annotated[str | None, typer.Option("--device", help="Only events from this device.")] = None,
    consumer_group: Annotated[
        str, typer.Option("--consumer-group", help="Consumer group (must exist; monitor never checkpoints).")
    ] = "$Default",
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Start at the oldest retained event instead of now.")
    ] = False,
    max_events: Annotated[
        int | None, typer.Option("--max-events", min=1, help="Stop after this many events.")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Stop after this many idle seconds (0: never).")
    ] = 0,
    compact: Annotated[bool, typer.Option("--compact", help="One JSON line per event.")] = False,
) -> None:
    """Print telemetry as JSON (origin, payload, properties, annotations) until Ctrl-C.

    Local mode reads the event stream directly; with --hub-url it follows the hub's feed (the
    connection string needs ServiceConnect). If the embedded stream is held by a hub running on this
    host, monitor follows that hub's feed instead.
    """
    state = state_of(ctx)
    opts = _Options(device, consumer_group, from_start, max_events, timeout, compact)

    async def body() -> None:
        from tether.messaging.events import validate_consumer_group

        validate_consumer_group(consumer_group)
        if device is not None:
            from tether.registry.models import validate_device_id

            validate_device_id(device)
        from tether.cli.remote import RemoteBackend

        # --hub-url, or the hub running on the data dir (its embedded stream admits one process).
        backend = state.backend(stream=True)
        if isinstance(backend, RemoteBackend):
            await backend.open()
            await _monitor_remote(backend, opts)
        else:
            await _monitor_local(state.settings(), opts)

    try:
        run(body)
    except KeyboardInterrupt:
        pass
