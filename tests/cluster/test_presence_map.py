"""The presence map's rules on a real JetStream KV bucket: newest connection wins by connect time, a
late first claim yields, a refresh yields to any other node, a release deletes only its own revision."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from backend_env import NATS_URL, require_nats

from tether.cluster.presence import Held, PresenceMap, SessionKV, open_bucket


@pytest.fixture
async def kv() -> AsyncIterator[Any]:
    require_nats()
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream(timeout=5)
    bucket = f"tt_pm_{secrets.token_hex(4)}"
    try:
        yield await open_bucket(js, bucket, ttl=60)
    finally:
        await js.delete_key_value(bucket)
        await nc.close()


async def test_newest_connection_wins(kv: Any) -> None:
    a, b = PresenceMap(kv, "node-a"), PresenceMap(kv, "node-b")
    on_a = Held(at=1_000)
    first = await a.claim("dev", on_a)
    assert first.previous is None and not first.superseded and on_a.rev is not None
    on_b = Held(at=2_000)
    moved = await b.claim("dev", on_b)
    assert moved.previous == "node-a" and not moved.superseded  # B tells A to let go
    assert await a.lookup("dev") == "node-b"

    late = Held(at=1_500)  # connected to A before B's connection, but claimed after it
    assert (await a.claim("dev", late)).superseded
    assert (await a.claim("dev", on_a, first=False)).superseded  # a refresh yields to another node
    assert await b.lookup("dev") == "node-b"

    await a.release("dev", on_a)  # A's old revision: B's entry stays
    assert await a.lookup("dev") == "node-b"
    await b.release("dev", on_b)
    assert await a.lookup("dev") is None
    again = Held(at=3_000)
    assert (await a.claim("dev", again)).previous is None  # re-created after the delete marker
    assert await b.lookup("dev") == "node-a"


async def test_sessions_store_and_forget(kv: Any) -> None:
    sessions = SessionKV(kv)
    assert await sessions.load("d1") == frozenset()
    await sessions.store("d1", frozenset({"methods", "c2d"}))
    assert await sessions.load("d1") == {"methods", "c2d"}
    await sessions.store("d1", frozenset())
    assert await sessions.load("d1") == frozenset()
    await sessions.store("never", frozenset())  # nothing stored: no delete marker written
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("never")
