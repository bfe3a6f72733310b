"""Stream fixtures: every shared behaviour runs on the embedded log and on NATS JetStream.

`backend` yields a factory building a fresh (not started) stream instance over the same storage, so a
test can close and reopen. JetStream runs use unique stream and bucket names, deleted afterwards; they
skip (with the reason) only when nothing listens on 127.0.0.1:4222.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether.messaging.events import EventStream
from tether.storage.stream.jetstream import JetStreamEventStream
from tether.storage.stream.local import LocalEventStream

NATS_URL = os.environ.get("TETHER_TEST_NATS_URL", "nats://127.0.0.1:4222")
PARTITIONS = 4


def nats_unreachable() -> str | None:
    host_port = NATS_URL.split("://", 1)[1].rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    try:
        socket.create_connection((host, int(port or 4222)), timeout=1).close()
    except OSError as exc:
        return f"NATS unreachable at {NATS_URL}: {exc}"
    return None


@dataclass
class Backend:
    name: str
    make: Callable[[], EventStream]


@pytest.fixture(params=["local", "jetstream"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        yield Backend("local", lambda: LocalEventStream(tmp_path / "stream", PARTITIONS, 24.0, 1 << 30))
        return
    reason = nats_unreachable()
    if reason:
        pytest.skip(reason)
    suffix = secrets.token_hex(4)

    def make() -> JetStreamEventStream:
        return JetStreamEventStream(NATS_URL, PARTITIONS, 24.0, 1 << 30, stream_name=f"TST_{suffix.upper()}",
                                    kv_bucket=f"tst_cp_{suffix}")

    yield Backend("jetstream", make)
    cleaner = make()
    await cleaner.start()
    await cleaner.delete_storage()
    await cleaner.close()


@pytest.fixture
async def stream(backend: Backend) -> AsyncIterator[EventStream]:
    s = backend.make()
    await s.start()
    try:
        yield s
    finally:
        await s.close()
