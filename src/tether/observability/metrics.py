"""Prometheus metrics for the device-facing data path, served at `/metrics`.

One process-wide `CollectorRegistry` (`REGISTRY`) holds counters updated on the hot path (cheap
increments, no labels per device; values accumulate across hubs in one process, as Prometheus
counters do) and a collector that reads each watched event stream's
`StreamStats` at scrape time, so the stream's group commit never calls into Prometheus.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from tether.storage.stream.base import StreamStats

__all__ = [
    "ACCEPT_BACKOFFS",
    "AUTH_FAILURES",
    "CONNECTED_DEVICES",
    "CONNECTIONS_REFUSED",
    "DISCONNECTS",
    "MESSAGES_IN",
    "MESSAGES_IN_BYTES",
    "REGISTRY",
    "SOCKETS",
    "metrics_handler",
    "render",
    "watch_stream",
]

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTED_DEVICES = Gauge(
    "tether_connected_devices",
    "Device and module connections currently authenticated, by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
MESSAGES_IN = Counter(
    "tether_d2c_messages",
    "Device-to-cloud telemetry messages accepted for the event stream, by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
MESSAGES_IN_BYTES = Counter(
    "tether_d2c_bytes",
    "Body bytes of the accepted device-to-cloud telemetry messages, by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "tether_auth_failures",
    "Refused authentication attempts on every surface (mqtt, mqttws, https, rest, ...) by reason slug; "
    "counted by the Authenticator, plus refusals before it is called (MQTT CONNECT checks, malformed "
    "HTTP requests). Reasons that would tell an unknown identity from a bad signature are merged into "
    "invalid-credential.",
    ["surface", "reason"],
    registry=REGISTRY,
)
ACCEPT_BACKOFFS = Counter(
    "tether_accept_backoffs",
    "Times a listener paused accepting because accept() failed for lack of resources (EMFILE: out of "
    "file descriptors, ENFILE, ENOBUFS, ENOMEM), by listener and error.",
    ["listener", "error"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "tether_connections_refused",
    "Sockets closed at accept (per-peer-limit, no-free-descriptor) or shed to make room for a new one "
    "(shed-idle: the longest-unproductive connection), by listener and reason.",
    ["listener", "reason"],
    registry=REGISTRY,
)
SOCKETS = Gauge(
    "tether_sockets",
    "Accepted sockets held by all listeners (open) and how many the descriptor budget allows (capacity).",
    ["state"],
    registry=REGISTRY,
)
DISCONNECTS = Counter(
    "tether_disconnects",
    "Device connections closed by the hub or the peer, by protocol and reason slug.",
    ["protocol", "reason"],
    registry=REGISTRY,
)


class _StreamCollector(Collector):
    """Exports `StreamStats` of every watched stream (weakly held: a closed hub disappears)."""

    def __init__(self) -> None:
        self.streams: weakref.WeakSet[Any] = weakref.WeakSet()

    def describe(self) -> list[Any]:
        return []  # dynamic: families depend on which streams are watched

    def collect(self) -> Iterator[Any]:
        stats = [s for s in (getattr(stream, "stats", None) for stream in list(self.streams))
                 if isinstance(s, StreamStats)]
        if not stats:
            return
        appends = CounterMetricFamily("tether_stream_appends", "Events made durable.", labels=["stream"])
        nbytes = CounterMetricFamily("tether_stream_append_bytes", "Bytes made durable.", labels=["stream"])
        errors = CounterMetricFamily("tether_stream_append_errors", "Failed appends.", labels=["stream"])
        batches = CounterMetricFamily("tether_stream_batches", "Group-commit batches.", labels=["stream"])
        last = GaugeMetricFamily("tether_stream_last_batch_size", "Events in last batch.", labels=["stream"])
        avg = GaugeMetricFamily("tether_stream_avg_batch_size", "Mean events per batch.", labels=["stream"])
        mx = GaugeMetricFamily("tether_stream_max_batch_size", "Largest batch so far.", labels=["stream"])
        fsync = HistogramMetricFamily(
            "tether_stream_fsync_seconds", "Time of the durability step (fsync / JetStream ack).",
            labels=["stream"],
        )
        for index, s in enumerate(stats):
            label = [str(index)]
            appends.add_metric(label, s.appends)
            nbytes.add_metric(label, s.append_bytes)
            errors.add_metric(label, s.append_errors)
            batches.add_metric(label, s.batches)
            last.add_metric(label, s.last_batch_size)
            avg.add_metric(label, s.average_batch_size)
            mx.add_metric(label, s.max_batch_size)
            buckets = [("+Inf" if math.isinf(b) else repr(b), float(n))
                       for b, n in sorted(s.fsync_seconds_buckets.items())]
            if not buckets or buckets[-1][0] != "+Inf":
                buckets.append(("+Inf", float(s.fsyncs)))
            fsync.add_metric(label, buckets, s.fsync_seconds_sum)
        yield from (appends, nbytes, errors, batches, last, avg, mx, fsync)


_STREAMS = _StreamCollector()
REGISTRY.register(_STREAMS)


def watch_stream(stream: object) -> None:
    """Export this stream's `stats` (if it has a `StreamStats`) on `/metrics`."""
    _STREAMS.streams.add(stream)


def render() -> bytes:
    """The Prometheus text exposition of `REGISTRY`."""
    return generate_latest(REGISTRY)


async def metrics_handler(request: web.Request) -> web.Response:
    """aiohttp handler for `GET /metrics` (Prometheus text format 0.0.4)."""
    del request
    return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
