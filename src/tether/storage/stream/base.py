"""The telemetry stream contract shared by every backend (embedded log, NATS JetStream).

Lives in `storage` so backends never import upward; `tether.messaging.events` re-exports it, and that is
the module the rest of Tether imports. Semantics every backend keeps (tests run against each):

- `sequence_number` starts at 0 per partition and grows by one per event; `offset` is monotonic too
  (a byte position for the embedded log, the sequence for JetStream) and is meant to be opaque.
- `append` returns only once the event is durable; `read` never shows an event that is not.
- A device always lands on the same partition (`partition_for_device`, CRC-32, stable across restarts
  and Python versions), so one device's events keep their order.
- Checkpoint values are stored as given: by Event Hubs convention the last processed sequence number.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tether.errors import BadRequest, TetherError

__all__ = [
    "DEFAULT_CONSUMER_GROUP",
    "EncodedProperties",
    "EventData",
    "EventStream",
    "RawEvent",
    "StreamError",
    "StreamStats",
    "partition_for_device",
    "subscribe",
    "validate_consumer_group",
]

DEFAULT_CONSUMER_GROUP = "$Default"
FSYNC_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, math.inf)
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")


class StreamError(TetherError):
    """The stream cannot serve the call: closed, failed after an I/O error, corrupt or unreachable."""

    http_status = 503
    default_code = "ServiceUnavailable"


@dataclass(frozen=True)
class EventData:
    """One stored telemetry event, as appended and as read back."""

    partition: int
    offset: int
    sequence_number: int
    enqueued_time_ms: int
    device_id: str
    module_id: str | None
    system_properties: dict[str, str]
    properties: dict[str, str]
    body: bytes

    def to_json(self, *, body_as_text: bool = True) -> dict[str, Any]:
        """JSON-ready dict (SSE, REST, tooling). The body is UTF-8 text when it decodes, else base64."""
        encoding = "base64"
        body: str | None = None
        if body_as_text:
            try:
                body = self.body.decode("utf-8")
                encoding = "utf-8"
            except UnicodeDecodeError:
                body = None
        if body is None:
            body = base64.b64encode(self.body).decode("ascii")
        return {
            "partition": self.partition,
            "offset": self.offset,
            "sequence_number": self.sequence_number,
            "enqueued_time_ms": self.enqueued_time_ms,
            "device_id": self.device_id,
            "module_id": self.module_id,
            "system_properties": dict(self.system_properties),
            "properties": dict(self.properties),
            "body": body,
            "body_encoding": encoding,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EventData:
        """Inverse of `to_json`; raises BadRequest on a malformed document."""
        try:
            encoding = data.get("body_encoding", "base64")
            raw = data["body"]
            if not isinstance(raw, str):
                raise TypeError("body must be a string")
            if encoding == "utf-8":
                body = raw.encode("utf-8")
            elif encoding == "base64":
                body = base64.b64decode(raw, validate=True)
            else:
                raise ValueError(f"unknown body_encoding {encoding!r}")
            module_id = data.get("module_id")
            return cls(
                partition=int(data["partition"]),
                offset=int(data["offset"]),
                sequence_number=int(data["sequence_number"]),
                enqueued_time_ms=int(data["enqueued_time_ms"]),
                device_id=str(data["device_id"]),
                module_id=None if module_id is None else str(module_id),
                system_properties={str(k): str(v) for k, v in data.get("system_properties", {}).items()},
                properties={str(k): str(v) for k, v in data.get("properties", {}).items()},
                body=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise BadRequest(f"invalid event document: {exc}") from exc


class EncodedProperties(dict[str, str]):
    """A property dict carrying its own JSON, built together by the telemetry pipeline so the embedded log
    stores these bytes instead of encoding the dict again per event (docs/performance.md, item 5).

    `encoded` must be exactly what the log's encoder writes for the dict: compact separators, insertion
    order, UTF-8, not ASCII-escaped. Read-only once built; any other backend just sees a dict."""

    __slots__ = ("encoded",)
    encoded: bytes


class RawEvent(NamedTuple):
    """An event as stored by a backend that keeps the properties as JSON (the embedded log's
    `read_raw`): consumers that write JSON anyway (the SSE feed) splice `system_json` and
    `properties_json` instead of decoding and re-encoding them. Both are compact UTF-8 JSON objects,
    not ASCII-escaped, `b""` when empty."""

    partition: int
    offset: int
    sequence_number: int
    enqueued_time_ms: int
    device_id: str
    module_id: str | None
    system_json: bytes
    properties_json: bytes
    body: bytes


@dataclass
class StreamStats:
    """Plain counters the integrator exports (Prometheus). `fsync_*` time the durability step: the
    fsync for the embedded log, the wait for the PubAck for JetStream. Buckets are cumulative (`le`)."""

    appends: int = 0
    append_bytes: int = 0
    append_errors: int = 0
    batches: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    fsyncs: int = 0
    fsync_seconds_sum: float = 0.0
    fsync_seconds_max: float = 0.0
    fsync_seconds_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys(FSYNC_BUCKETS, 0))
    reads: int = 0
    read_events: int = 0
    segments_rolled: int = 0
    segments_deleted: int = 0
    recovered_truncated_bytes: int = 0

    def observe_fsync(self, seconds: float) -> None:
        self.fsyncs += 1
        self.fsync_seconds_sum += seconds
        self.fsync_seconds_max = max(self.fsync_seconds_max, seconds)
        for bound in self.fsync_seconds_buckets:
            if seconds <= bound:
                self.fsync_seconds_buckets[bound] += 1

    def observe_batch(self, size: int, nbytes: int) -> None:
        self.appends += size
        self.append_bytes += nbytes
        self.batches += 1
        self.last_batch_size = size
        self.max_batch_size = max(self.max_batch_size, size)

    @property
    def average_batch_size(self) -> float:
        return self.appends / self.batches if self.batches else 0.0


@runtime_checkable
class EventStream(Protocol):
    """Durable, partitioned telemetry log (the Event Hubs-compatible endpoint's storage)."""

    partition_count: int
    stats: StreamStats  # plain counters, exported to Prometheus by observability.metrics

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def append(
        self,
        device_id: str,
        body: bytes,
        *,
        module_id: str | None = None,
        properties: Mapping[str, str],
        system_properties: Mapping[str, str],
    ) -> EventData: ...

    async def read(
        self, partition: int, *, from_sequence: int = 0, max_count: int = 100, timeout_s: float = 0.0
    ) -> list[EventData]: ...

    def partition_for(self, device_id: str) -> int: ...

    async def consumer_groups(self) -> list[str]: ...

    async def create_consumer_group(self, name: str) -> None: ...

    async def delete_consumer_group(self, name: str) -> None: ...

    async def checkpoint(self, group: str, partition: int, sequence_number: int) -> None: ...

    async def get_checkpoint(self, group: str, partition: int) -> int | None: ...

    async def find_sequence_at(self, partition: int, enqueued_time_ms: int) -> int: ...

    async def latest_sequence(self, partition: int) -> int: ...  # -1 when the partition is empty


def partition_for_device(device_id: str, partitions: int) -> int:
    """Stable device → partition mapping (never Python's salted `hash()`)."""
    return zlib.crc32(device_id.encode("utf-8")) % partitions


def validate_consumer_group(name: str) -> str:
    """Event Hubs' rule: 1–50 of letters, digits, `.`, `_`, `-`, starting alphanumeric; or `$Default`."""
    if name == DEFAULT_CONSUMER_GROUP or _GROUP_RE.match(name):
        return name
    raise BadRequest(
        "consumer group names are 1-50 letters, digits, '.', '_' or '-', starting with a letter or digit",
        code="ArgumentInvalid",
        field="name",
    )


def check_partition(partition: int, partition_count: int) -> None:
    if not 0 <= partition < partition_count:
        raise BadRequest(
            f"partition must be between 0 and {partition_count - 1}",
            code="ArgumentInvalid",
            field="partition",
        )


async def subscribe(
    stream: EventStream,
    partition: int,
    from_sequence: int = 0,
    *,
    batch: int = 100,
    poll_s: float = 30.0,
) -> AsyncGenerator[EventData, None]:
    """Endless iterator over one partition (SSE, tooling), built on long-poll `read`.

    Stops when the stream is closed; skips forward when retention deleted the next events.
    """
    next_seq = from_sequence
    while True:
        try:
            events = await stream.read(partition, from_sequence=next_seq, max_count=batch, timeout_s=poll_s)
        except StreamError:
            return
        for event in events:
            next_seq = event.sequence_number + 1
            yield event
