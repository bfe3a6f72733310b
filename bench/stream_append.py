"""Append throughput of the event stream: N concurrent appenders x M events of 256 bytes each.

Not a test. Usage: python bench/stream_append.py [--appenders 64] [--events 200] [--partitions 4]
[--dir /tmp/x] [--nats nats://127.0.0.1:4222]. Prints append events/s, average group-commit batch
size, fsync time and read-back events/s for the embedded log, then the same for JetStream when NATS
answers (its streams are deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import tempfile
import time
from pathlib import Path

from tether.messaging.events import EventStream
from tether.storage.stream.jetstream import JetStreamEventStream
from tether.storage.stream.local import LocalEventStream

BODY = b"t" * 256
PROPS = {"alert": "high", "zone": "a"}
SYS_PROPS = {"message-id": "m", "content-type": "application/json"}


async def run(stream: EventStream, appenders: int, events: int) -> float:
    async def appender(n: int) -> None:
        device = f"bench-{n}"
        for _ in range(events):
            await stream.append(device, BODY, properties=PROPS, system_properties=SYS_PROPS)

    started = time.perf_counter()
    await asyncio.gather(*(appender(n) for n in range(appenders)))
    return time.perf_counter() - started


async def read_all(stream: EventStream) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    for p in range(stream.partition_count):
        seq = 0
        while batch := await stream.read(p, from_sequence=seq, max_count=500):
            count += len(batch)
            seq = batch[-1].sequence_number + 1
    return count, time.perf_counter() - started


def report(name: str, stream: LocalEventStream | JetStreamEventStream, total: int, seconds: float) -> None:
    st = stream.stats
    fsync_ms = 1000 * st.fsync_seconds_sum / st.fsyncs if st.fsyncs else 0.0
    print(
        f"{name:10s} {total} events in {seconds:.2f}s = {total / seconds:,.0f} events/s; "
        f"avg batch {st.average_batch_size:.1f} (max {st.max_batch_size}); "
        f"avg fsync/ack {fsync_ms:.2f} ms over {st.fsyncs}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--appenders", type=int, default=64)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    args = ap.parse_args()
    total = args.appenders * args.events

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        local = LocalEventStream(Path(tmp) / "stream", args.partitions, 24.0, 1 << 30)
        await local.start()
        try:
            report("local", local, total, await run(local, args.appenders, args.events))
            n, secs = await read_all(local)
            print(f"local      read back {n} events at {n / secs:,.0f} events/s (batches of 500)")
        finally:
            await local.close()

    host, _, port = args.nats.split("://", 1)[1].rpartition("@")[2].partition(":")
    try:
        socket.create_connection((host, int(port or 4222)), timeout=1).close()
    except OSError as exc:
        print(f"jetstream  skipped: {exc}")
        return
    suffix = secrets.token_hex(3)
    js = JetStreamEventStream(
        args.nats,
        args.partitions,
        1.0,
        1 << 30,
        stream_name=f"BENCH_{suffix.upper()}",
        kv_bucket=f"bench_cp_{suffix}",
    )
    await js.start()
    try:
        report("jetstream", js, total, await run(js, args.appenders, args.events))
        n, secs = await read_all(js)
        print(f"jetstream  read back {n} events at {n / secs:,.0f} events/s (batches of 500)")
    finally:
        await js.delete_storage()
        await js.close()


if __name__ == "__main__":
    asyncio.run(main())
