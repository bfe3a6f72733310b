"""Telemetry stream: the one interface protocol adapters append device events to and consumers read.

`EventData`, `EventStream` and friends are defined in `tether.storage.stream.base` (so the storage
backends need not import upward) and re-exported here: import them from this module. `open_stream`
picks the backend from the configured URL:

- `file:///abs/path` → `LocalEventStream` (embedded segment log; optional `?segment_bytes=N`)
- `nats://host:port` (or `tls://`) → `JetStreamEventStream` (optional `?stream=NAME&bucket=NAME`)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from tether.storage.stream.base import (
    DEFAULT_CONSUMER_GROUP,
    EventData,
    EventStream,
    StreamError,
    StreamStats,
    partition_for_device,
    subscribe,
    validate_consumer_group,
)

__all__ = [
    "DEFAULT_CONSUMER_GROUP",
    "EventData",
    "EventStream",
    "StreamError",
    "StreamStats",
    "open_stream",
    "partition_for_device",
    "subscribe",
    "validate_consumer_group",
]


def open_stream(url: str, *, partitions: int, retention_hours: float, retention_bytes: int) -> EventStream:
    """Build (not start) the stream for `url`; the caller awaits `start()` and later `close()`."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file stream URL must be file:///absolute/path, got {url!r}")
        path = Path(unquote(parts.path))
        if not path.is_absolute():
            raise ValueError(f"file stream URL needs an absolute path, got {url!r}")
        from tether.storage.stream.local import LocalEventStream

        segment_bytes = int(query["segment_bytes"]) if "segment_bytes" in query else None
        return LocalEventStream(
            path, partitions, retention_hours, retention_bytes, segment_bytes=segment_bytes
        )
    if parts.scheme in ("nats", "tls"):
        from tether.storage.stream.jetstream import JetStreamEventStream

        server = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        return JetStreamEventStream(
            server,
            partitions,
            retention_hours,
            retention_bytes,
            stream_name=query.get("stream", "TETHER_EVENTS"),
            kv_bucket=query.get("bucket", "tether_checkpoints"),
        )
    raise ValueError(f"unsupported event stream URL scheme {parts.scheme!r} (use file:// or nats://)")
