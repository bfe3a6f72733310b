"""`tether monitor`: print live telemetry like `az iot hub monitor-events --properties all`.

Reads the hub's event stream directly (local mode); every partition is followed concurrently with
long-poll reads, so events appear as soon as the hub has made them durable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tether.cli.context import cli_errors, run, state_of
from tether.cli.output import echo_json
from tether.config import ConfigError
from tether.errors import NotFound

if TYPE_CHECKING:
    from tether.messaging.events import EventData, EventStream

POLL_S = 1.0
BATCH = 100
ANNOTATION_PREFIXES = ("iothub-", "x-opt-")


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

    Monitor needs local mode for now (run it on the hub host, without --hub-url): it reads the
    event stream directly. The embedded file stream admits one process at a time, so with the default
    stream run it while the hub is stopped; a NATS stream (storage.stream_url) can be read live.
    """
    with cli_errors():
        settings = state_of(ctx).require_local("monitor")

    async def body() -> None:
        from tether.messaging.events import StreamError, open_stream, validate_consumer_group

        validate_consumer_group(consumer_group)
        if device is not None:
            from tether.registry.models import validate_device_id

            validate_device_id(device)
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
            raise StreamError(
                f"{exc.message}: the embedded event stream can be read by one process only, so stop the "
                "hub first or use a NATS stream (storage.stream_url = nats://…); live monitoring of a "
                "running embedded hub needs the hub's streaming endpoint (not available yet)"
            ) from None
        try:
            if consumer_group not in await stream.consumer_groups():
                raise NotFound(f"consumer group {consumer_group!r} does not exist", code="NotFound")
            partitions = (
                [stream.partition_for(device)]
                if device is not None
                else list(range(stream.partition_count))
            )
            now_ms = int(time.time() * 1000)
            starts = {
                p: 0 if from_start else await stream.find_sequence_at(p, now_ms) for p in partitions
            }
            printer = _Printer(max_events, compact)
            tasks = [asyncio.create_task(_follow(stream, p, starts[p], device, printer)) for p in partitions]
            if timeout > 0:
                tasks.append(asyncio.create_task(_watch_idle(printer, timeout)))
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
        finally:
            await stream.close()

    try:
        run(body)
    except KeyboardInterrupt:
        pass
