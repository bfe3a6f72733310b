"""Telemetry consumer API over HTTPS: a Tether extension.

Azure IoT Hub hands telemetry to back ends through its Event Hubs-compatible AMQP endpoint; Tether
has no AMQP consumer endpoint, so consumers read the same stream here: partition metadata, consumer
groups and checkpoints, a long-poll read per partition, and a Server-Sent Events feed across all
partitions (what `tether monitor` uses against a running hub). Every route needs ServiceConnect, the
right Azure requires to read the built-in endpoint.

`FEATURE` is this module's part of the route table (`api.app` lists it); its setup keeps the open
feeds on the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from tether.api.bodies import query_bool, query_int, read_optional_json_object
from tether.api.context import hub_of, principal_of
from tether.api.devices import validation_error
from tether.api.event_feed import (
    EPOCH,
    Chunk,
    Feed,
    FeedRenderer,
    PlansRaw,
    ReadsRaw,
    event_doc,
    event_json,
    raw_event_json,
    render,
)
from tether.api.routes import Feature, Param, Route
from tether.errors import BadRequest, NotFound, TetherError, Throttled
from tether.messaging.events import DEFAULT_CONSUMER_GROUP, EventStream, StreamError
from tether.messaging.events import validate_consumer_group as _validate_group
from tether.registry.models import validate_device_id
from tether.security.principal import Permission

if TYPE_CHECKING:
    from tether.hub import Hub

log = logging.getLogger("tether.api.events")

__all__ = ["CONSUMERS_KEY", "EVENT_ROUTES", "FEATURE", "NEXT_SEQUENCE_HEADER", "event_doc"]

NEXT_SEQUENCE_HEADER = "x-tether-next-sequence"
MAX_POLL_S = 60.0
DEFAULT_POLL_S = 20.0
MAX_COUNT = 1000
HEARTBEAT_S = 15.0
CHECKPOINT_EVERY_S = 1.0
MAX_FEEDS = 256  # open SSE feeds per hub: each holds a reader task per partition


class _Consumers:
    """Long-lived requests of one app. At shutdown they end at once instead of holding aiohttp's
    graceful-shutdown wait (a long-poll lasts up to a minute, a feed forever)."""

    def __init__(self, renderer: FeedRenderer | None) -> None:
        self.closing = asyncio.Event()
        self.feeds = 0  # open SSE feeds
        self.renderer = renderer

    async def on_shutdown(self, _app: web.Application) -> None:
        self.closing.set()

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.renderer is not None:
            self.renderer.close()


CONSUMERS_KEY: web.AppKey[_Consumers] = web.AppKey("tether_event_consumers")


@runtime_checkable
class _KnowsLatest(Protocol):
    async def latest_sequence(self, partition: int) -> int: ...


# --- wire documents (for the OpenAPI spec; handlers build the same shapes as plain dicts) ----------
class _Doc(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class EventDoc(_Doc):
    """One telemetry event. `body` is UTF-8 text, or base64 when `bodyEncoding` says so."""

    partition: int
    offset: str = Field(description="Opaque position; pass it back as fromOffset.")
    sequence_number: int = Field(alias="sequenceNumber")
    enqueued_time: datetime = Field(alias="enqueuedTime")
    device_id: str = Field(alias="deviceId")
    module_id: str | None = Field(alias="moduleId")
    system_properties: dict[str, str] = Field(alias="systemProperties")
    properties: dict[str, str]
    body: str
    body_encoding: str = Field(alias="bodyEncoding", description="utf-8 | base64")


class PartitionDoc(_Doc):
    id: int
    last_sequence_number: int | None = Field(None, alias="lastSequenceNumber",
                                             description="-1 when empty; omitted when unknown.")


class PartitionsDoc(_Doc):
    partition_count: int = Field(alias="partitionCount")
    partitions: list[PartitionDoc]


class ConsumerGroupDoc(_Doc):
    name: str


class CheckpointDoc(_Doc):
    consumer_group: str = Field(alias="consumerGroup")
    partition: int
    sequence_number: int | None = Field(alias="sequenceNumber", description="Last processed; null: none.")


class CheckpointUpdate(_Doc):
    """Body of `PUT …/checkpoints/{partition}`: the last processed sequence number."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    sequence_number: StrictInt = Field(alias="sequenceNumber", ge=0)


# --- documents and parameters ----------------------------------------------------------------------
def _partition(request: web.Request, stream: EventStream) -> int:
    raw, last = request.match_info["partition"], stream.partition_count - 1
    if not raw.isdigit():
        raise BadRequest(f"partition must be a number from 0 to {last}, got {raw!r}", field="partition")
    if int(raw) > last:
        raise NotFound(f"partition {int(raw)} does not exist; this hub has partitions 0-{last}",
                       code="PartitionNotFound", field="partition")
    return int(raw)


def _group_name(name: str, field: str) -> str:
    try:
        return _validate_group(name)
    except BadRequest as exc:
        raise BadRequest(exc.message, code=exc.code, field=field) from None


async def _existing_group(stream: EventStream, name: str | None, field: str = "consumerGroup") -> str:
    name = _group_name(name or DEFAULT_CONSUMER_GROUP, field)
    if name not in await stream.consumer_groups():
        raise NotFound(f"consumer group {name!r} not found", code="ConsumerGroupNotFound", field=field)
    return name


def _query_seconds(request: web.Request, name: str, *, default: float, low: float, high: float) -> float:
    raw = request.query.get(name) or ""
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise BadRequest(f"{name} must be a number of seconds", field=name) from None
    if not low <= value <= high:  # also refuses NaN
        raise BadRequest(f"{name} must be between {low:g} and {high:g} seconds", field=name)
    return value


def parse_time_ms(raw: str, field: str) -> int:
    """ISO 8601 (no zone = UTC) or integer milliseconds since the epoch."""
    if raw.isdigit():
        return int(raw)
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{field} must be an ISO 8601 date-time or epoch milliseconds, got {raw!r}",
                         field=field) from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return max(0, (moment - EPOCH) // timedelta(milliseconds=1))


async def next_sequence(stream: EventStream, partition: int) -> int:
    """The sequence the next append to `partition` gets ("end of stream")."""
    if isinstance(stream, _KnowsLatest):
        return await stream.latest_sequence(partition)
    return await stream.find_sequence_at(partition, int(time.time() * 1000) + 86_400_000)


async def _after_checkpoint(stream: EventStream, group: str, partition: int) -> int:
    checkpoint = await stream.get_checkpoint(group, partition)
    return 0 if checkpoint is None else checkpoint + 1


async def _sequence_after_offset(stream: EventStream, partition: int, offset: int) -> int:
    """First sequence whose event's offset is greater than `offset` (an Event Hubs offset position is
    exclusive). Offsets grow with sequences, so a binary search of one-event reads finds it."""
    first = await stream.read(partition, from_sequence=0, max_count=1)
    if not first or first[0].offset > offset:
        return first[0].sequence_number if first else 0
    low, high = first[0].sequence_number, await next_sequence(stream, partition)
    while high - low > 1:  # the event at `low` has offset <= target; the answer is in (low, high]
        mid = (low + high) // 2
        found = await stream.read(partition, from_sequence=mid, max_count=1)
        if not found or found[0].sequence_number >= high or found[0].offset > offset:
            high = mid
        else:
            low = found[0].sequence_number
    return high


_POSITIONS = ("fromSequence", "fromOffset", "fromEnqueuedTime", "fromCheckpoint")


async def _read_start(request: web.Request, stream: EventStream, group: str, partition: int) -> int:
    given = [name for name in _POSITIONS if request.query.get(name, "") not in ("", "false")]
    if len(given) > 1:
        raise BadRequest(f"give at most one of {', '.join(_POSITIONS)} (got {', '.join(given)})",
                         field=given[1])
    how = given[0] if given else "fromSequence"
    raw = request.query.get(how, "")
    if how == "fromSequence":
        return query_int(request, how, default=0, low=0, high=2**63 - 1)
    if how == "fromEnqueuedTime":
        return await stream.find_sequence_at(partition, parse_time_ms(raw, how))
    if how == "fromCheckpoint":
        return await _after_checkpoint(stream, group, partition) if query_bool(request, how) else 0
    if raw in ("-1", "@latest"):
        return 0 if raw == "-1" else await next_sequence(stream, partition)
    if not raw.isdigit():
        raise BadRequest("fromOffset must be an offset from an event, -1 (start) or @latest", field=how)
    return await _sequence_after_offset(stream, partition, int(raw))


# --- partitions, consumer groups, checkpoints -------------------------------------------------------
async def list_partitions(request: web.Request) -> web.Response:
    stream = hub_of(request).stream
    partitions: list[dict[str, int]] = [{"id": p} for p in range(stream.partition_count)]
    if isinstance(stream, _KnowsLatest):
        for doc in partitions:
            doc["lastSequenceNumber"] = await stream.latest_sequence(doc["id"]) - 1
    return web.json_response({"partitionCount": stream.partition_count, "partitions": partitions})


async def list_consumer_groups(request: web.Request) -> web.Response:
    return web.json_response([{"name": g} for g in await hub_of(request).stream.consumer_groups()])


async def put_consumer_group(request: web.Request) -> web.Response:
    """Idempotent: 201 when created, 200 when it already exists (`$Default` always does)."""
    stream, name = hub_of(request).stream, _group_name(request.match_info["group"], "group")
    if name in await stream.consumer_groups():
        return web.json_response({"name": name})
    await stream.create_consumer_group(name)  # a concurrent create surfaces as 409
    await _audit(request, "consumer-group.create", name)
    return web.json_response({"name": name}, status=201)


async def delete_consumer_group(request: web.Request) -> web.Response:
    name = request.match_info["group"]
    await hub_of(request).stream.delete_consumer_group(name)  # $Default → 400, unknown → 404
    await _audit(request, "consumer-group.delete", name)
    return web.Response(status=204)


async def _audit(request: web.Request, action: str, group: str) -> None:
    await hub_of(request).audit.record(action, "ok", principal=principal_of(request).name, target=group)


async def list_checkpoints(request: web.Request) -> web.Response:
    stream = hub_of(request).stream
    group = await _existing_group(stream, request.match_info["group"], "group")
    return web.json_response([_checkpoint_doc(group, p, await stream.get_checkpoint(group, p))
                              for p in range(stream.partition_count)])


def _checkpoint_doc(group: str, partition: int, sequence: int | None) -> dict[str, Any]:
    return {"consumerGroup": group, "partition": partition, "sequenceNumber": sequence}


async def checkpoint_route(request: web.Request) -> web.Response:
    """GET or PUT one partition's checkpoint: the last processed sequence number."""
    stream = hub_of(request).stream
    group = await _existing_group(stream, request.match_info["group"], "group")
    partition = _partition(request, stream)
    if request.method == "GET":
        sequence = await stream.get_checkpoint(group, partition)
        return web.json_response(_checkpoint_doc(group, partition, sequence))
    try:
        sequence = CheckpointUpdate.model_validate(await read_optional_json_object(request)).sequence_number
    except ValidationError as exc:
        raise validation_error(exc) from None
    if isinstance(stream, _KnowsLatest) and sequence >= (end := await stream.latest_sequence(partition)):
        raise BadRequest(f"sequenceNumber {sequence} is past the last event of partition {partition} "
                         f"({end - 1})", field="sequenceNumber")
    await stream.checkpoint(group, partition, sequence)
    return web.json_response(_checkpoint_doc(group, partition, sequence))


# --- long-poll read ---------------------------------------------------------------------------------
async def read_messages(request: web.Request) -> web.Response:
    """Answers as soon as one event is there, or with `[]` after `timeout` seconds (or at shutdown)."""
    stream = hub_of(request).stream
    partition = _partition(request, stream)
    group = await _existing_group(stream, request.query.get("consumerGroup"))
    max_count = query_int(request, "maxCount", default=100, low=1, high=MAX_COUNT)
    timeout = _query_seconds(request, "timeout", default=DEFAULT_POLL_S, low=0, high=MAX_POLL_S)
    start = await _read_start(request, stream, group, partition)
    read = asyncio.ensure_future(_read_json(stream, partition, start, max_count, timeout))
    stop = asyncio.ensure_future(request.app[CONSUMERS_KEY].closing.wait())
    try:
        await asyncio.wait((read, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (read, stop):
            task.cancel()
        await asyncio.gather(read, stop, return_exceptions=True)
    docs, following = ([], start) if read.cancelled() else read.result()
    return web.Response(text=f"[{','.join(docs)}]", content_type="application/json",
                        headers={NEXT_SEQUENCE_HEADER: str(following)})


async def _read_json(stream: EventStream, partition: int, start: int, max_count: int,
                     timeout: float) -> tuple[list[str], int]:
    """The events' JSON documents (spliced from the stored JSON where the stream keeps it) and the
    sequence to continue from."""
    if isinstance(stream, ReadsRaw):
        raw = await stream.read_raw(partition, from_sequence=start, max_count=max_count, timeout_s=timeout)
        return [raw_event_json(e) for e in raw], raw[-1].sequence_number + 1 if raw else start
    events = await stream.read(partition, from_sequence=start, max_count=max_count, timeout_s=timeout)
    return [event_json(e) for e in events], events[-1].sequence_number + 1 if events else start


# --- Server-Sent Events ----------------------------------------------------------------------------
async def _feed_starts(request: web.Request, stream: EventStream, group: str, partitions: list[int],
                       checkpointing: bool) -> dict[int, int]:
    """Where each partition's reader starts: `Last-Event-ID` (the id of the last event a client saw,
    `partition:nextSequence,…`) where it names the partition, else the `from` parameter."""
    how = request.query.get("from") or ("checkpoint" if checkpointing else "end")
    at_ms = None if how in ("start", "end", "checkpoint") else parse_time_ms(how, "from")
    raw = request.headers.get("Last-Event-ID", "")
    pairs = [item.strip().partition(":") for item in raw.split(",") if item.strip()]
    if not all(p.isdigit() and s.isdigit() and int(p) in partitions for p, _, s in pairs):
        raise BadRequest("Last-Event-ID must be an event id from this feed (partition:sequence,…)",
                         field="Last-Event-ID")
    starts = {int(p): int(s) for p, _, s in pairs}
    for p in partitions:
        if p in starts:
            continue
        if at_ms is not None:
            starts[p] = await stream.find_sequence_at(p, at_ms)
        elif how == "checkpoint":
            starts[p] = await _after_checkpoint(stream, group, p)
        else:
            starts[p] = 0 if how == "start" else await next_sequence(stream, p)
    return starts


async def stream_events(request: web.Request) -> web.StreamResponse:
    """`text/event-stream` of every partition's events (or one device's), heartbeat comments while
    idle; with `checkpoint=true` the group is checkpointed, at most every second and at the end, up to
    the events written to the connection."""
    stream = hub_of(request).stream
    group = await _existing_group(stream, request.query.get("consumerGroup"))
    device = request.query.get("device") or None
    if device is not None:
        validate_device_id(device, field="device")
    checkpointing = query_bool(request, "checkpoint")
    if checkpointing and device is not None:
        raise BadRequest("checkpoint=true cannot be combined with device: it would mark other devices' "
                         "events as processed", field="checkpoint")
    heartbeat = _query_seconds(request, "heartbeat", default=HEARTBEAT_S, low=1, high=60)
    if request.app[CONSUMERS_KEY].feeds >= MAX_FEEDS:
        raise Throttled(f"this hub serves at most {MAX_FEEDS} event feeds at a time; use fewer or long-poll")
    partitions = [stream.partition_for(device)] if device else list(range(stream.partition_count))
    starts = await _feed_starts(request, stream, group, partitions, checkpointing)

    consumers = request.app[CONSUMERS_KEY]
    if consumers.renderer is not None:
        try:
            await consumers.renderer.ready()
        except (OSError, StreamError) as exc:  # e.g. no semaphores for this user: not a reason to fail
            log.warning("event feed renderer processes unavailable (%s): rendering in the hub", exc)
            consumers.renderer.close()
            consumers.renderer = None
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type, response.charset = "text/event-stream", "utf-8"
    await response.prepare(request)
    feed = Feed(request, stream, starts, device, consumers.closing, consumers.renderer)
    consumers.feeds += 1
    positions, pending, last_checkpoint = dict(starts), dict[int, int](), time.monotonic()
    try:
        await feed.send(request, response, b": connected\n\n")
        chunks: list[Chunk] | None
        while (chunks := await feed.next_chunks(heartbeat)) is not None:
            if not chunks:
                await feed.send(request, response, b": heartbeat\n\n")
                continue
            await feed.send(request, response, render(chunks, positions))
            pending.update((c.partition, c.events[-1][0]) for c in chunks)
            if checkpointing and time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY_S:
                await _checkpoint(stream, group, pending)
                last_checkpoint = time.monotonic()
    except ConnectionError:
        feed.end("client disconnected")
    except TetherError as exc:  # a checkpoint failed (group deleted, stream closing)
        feed.end(f"checkpoint failed: {exc.message}")
    finally:
        await feed.close()
        if checkpointing and pending:
            with contextlib.suppress(TetherError):
                await _checkpoint(stream, group, pending)
        consumers.feeds -= 1
    if feed.reason != "client disconnected":
        with contextlib.suppress(ConnectionError):
            await response.write(f": closing: {feed.reason}\n\n".encode())
            await response.write_eof()
    return response


async def _checkpoint(stream: EventStream, group: str, pending: dict[int, int]) -> None:
    for partition, sequence in list(pending.items()):
        await stream.checkpoint(group, partition, sequence)
        del pending[partition]


# --- route table ------------------------------------------------------------------------------------
SERVICE = Permission.service_connect
TAG = "tether-events"
GROUP = Param("consumerGroup", "query", "Consumer group (default `$Default`); must exist.")
CHECKPOINT_PATH = "/tether/events/consumergroups/{group}/checkpoints/{partition}"
EVENT_ROUTES: tuple[Route, ...] = (
    Route("GET", "/tether/events/partitions", list_partitions, "Partitions of the telemetry stream",
          SERVICE, TAG, response=PartitionsDoc),
    Route("GET", "/tether/events/consumergroups", list_consumer_groups, "List consumer groups", SERVICE,
          TAG, response=ConsumerGroupDoc, array=True),
    Route("PUT", "/tether/events/consumergroups/{group}", put_consumer_group,
          "Create a consumer group (idempotent: 201 created, 200 exists)", SERVICE, TAG,
          response=ConsumerGroupDoc, status=201),
    Route("DELETE", "/tether/events/consumergroups/{group}", delete_consumer_group,
          "Delete a consumer group and its checkpoints (not `$Default`: 400)", SERVICE, TAG, status=204),
    Route("GET", "/tether/events/consumergroups/{group}/checkpoints", list_checkpoints,
          "Checkpoints of a consumer group, one per partition", SERVICE, TAG, response=CheckpointDoc,
          array=True),
    Route("GET", CHECKPOINT_PATH, checkpoint_route, "Checkpoint of one partition", SERVICE, TAG,
          response=CheckpointDoc),
    Route("PUT", CHECKPOINT_PATH, checkpoint_route, "Set a checkpoint (last processed sequence number)",
          SERVICE, TAG, request=CheckpointUpdate, response=CheckpointDoc),
    Route("GET", "/tether/events/partitions/{partition}/messages", read_messages,
          "Read events of one partition (long-poll)", SERVICE, TAG, response=EventDoc, array=True,
          response_headers=(NEXT_SEQUENCE_HEADER,),
          description="Answers as soon as an event is available, else `[]` after `timeout`. Continue "
                      f"from the `{NEXT_SEQUENCE_HEADER}` header. At most one `from…` parameter.",
          params=(GROUP,
                  Param("fromSequence", "query", "Default 0 (oldest retained).", {"type": "integer"}),
                  Param("fromOffset", "query", "After this offset (exclusive); `-1` start, `@latest` end."),
                  Param("fromEnqueuedTime", "query", "ISO 8601 date-time or epoch milliseconds."),
                  Param("fromCheckpoint", "query", "After the group's checkpoint.", {"type": "boolean"}),
                  Param("maxCount", "query", "1-1000, default 100.", {"type": "integer"}),
                  Param("timeout", "query", "Seconds to wait, 0-60, default 20.", {"type": "number"}))),
    Route("GET", "/tether/events/stream", stream_events, "Server-Sent Events feed of all partitions",
          SERVICE, TAG,
          description="`text/event-stream`: `id: {resume position}` + `data: {event JSON}` per event, "
                      "`: heartbeat` comments while idle. Ends when the client leaves, the token "
                      "expires or the hub stops; send `Last-Event-ID` to resume.",
          params=(GROUP,
                  Param("from", "query", "start | end (default) | checkpoint (default with checkpoint=true) "
                        "| ISO 8601 time | epoch ms."),
                  Param("device", "query", "Only this device's events (reads its partition only)."),
                  Param("checkpoint", "query", "Checkpoint the group as events are written.",
                        {"type": "boolean"}),
                  Param("heartbeat", "query", "Seconds between heartbeats, 1-60, default 15.",
                        {"type": "number"}),
                  Param("Last-Event-ID", "header", "Resume after this event id."))),
)


def _setup(app: web.Application, hub: Hub) -> None:
    """The consumers' state (open feeds, the optional feed renderer) lives on the app."""
    processes = hub.settings.storage.stream_reader_processes
    renderer = FeedRenderer(processes) if processes and isinstance(hub.stream, PlansRaw) else None
    app[CONSUMERS_KEY] = consumers = _Consumers(renderer)
    app.on_shutdown.append(consumers.on_shutdown)
    app.on_cleanup.append(consumers.on_cleanup)


FEATURE = Feature("events", EVENT_ROUTES, setup=_setup)
