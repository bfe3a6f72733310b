"""The cluster's presence map and shared session subscriptions, in two JetStream KV buckets.

Presence (`{prefix}_presence`, history 1, TTL `PRESENCE_TTL_S`): identity key →
`{"node", "at"}` of its newest connection. A node claims the key after a device connected to it (after
CONNACK, off the connect path) and deletes it — only if it still holds that revision — when the device
disconnects. Newest connection wins, by the connect time `at` (milliseconds, wall clock): a node that
finds a newer entry of another node lets its own connection go (the device connected elsewhere since),
one that finds an older one tells that node to close it (session takeover).

A node that dies leaves its entries behind, which costs nothing: requests to a dead node fail at once
with "no responders" (its NATS connection is gone), notices to it go nowhere, the device's reconnect
elsewhere overwrites the entry, and entries nobody refreshes expire after the TTL. Live nodes re-claim
their identities every `PRESENCE_REFRESH_S` (and after a NATS reconnect), so a held entry never expires.

Sessions (`{prefix}_sessions`): identity key → the subscription kinds of its persistent
MQTT session, so a device that reconnects to another node keeps its methods, desired patches and C2D.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

import nats.js.errors
from nats.js import api

__all__ = [
    "PRESENCE_REFRESH_S",
    "PRESENCE_TTL_S",
    "Claim",
    "Held",
    "PresenceMap",
    "SessionKV",
    "open_bucket",
]

PRESENCE_TTL_S: Final = 1800.0
PRESENCE_REFRESH_S: Final = 600.0
_CLAIM_ATTEMPTS: Final = 8
_WRONG_LAST: Final = (10071, 10164)  # JetStream: wrong last sequence (the key changed meanwhile)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(eq=False)
class Held:
    """This node's view of one of its connections: connect time, KV revision once claimed."""

    at: int
    rev: int | None = None
    released: bool = False  # disconnected or replaced by a newer local connection


@dataclass(frozen=True)
class Claim:
    """Outcome of a claim: the node that held the identity before (to tell it), or `superseded`
    when another node holds a newer connection of it (this node's connection must go)."""

    previous: str | None = None
    superseded: bool = False


async def open_bucket(js: Any, bucket: str, *, ttl: float | None) -> Any:
    """The KV bucket (file storage, so it survives a NATS restart), created on first use (several
    nodes may race to create it)."""
    for _ in range(3):
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(bucket=bucket, history=1, ttl=ttl,
                                             storage=api.StorageType.FILE)
        except nats.js.errors.BadRequestError:
            continue  # another node created it meanwhile (with the same settings): open it
    return await js.key_value(bucket)


def _entry_value(entry: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(entry.value or b"")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class PresenceMap:
    """Identity key → holding node, over the presence KV bucket."""

    def __init__(self, kv: Any, node_id: str) -> None:
        self.kv = kv
        self.node_id = node_id

    async def _get(self, key: str) -> Any | None:
        try:
            return await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError
            return None

    async def lookup(self, key: str) -> str | None:
        """The node holding `key`, None when no node claims it."""
        entry = await self._get(key)
        value = None if entry is None else _entry_value(entry)
        node = None if value is None else value.get("node")
        return node if isinstance(node, str) else None

    async def claim(self, key: str, held: Held, *, first: bool = True) -> Claim:
        """Write this node as the holder of `key` unless a newer connection holds it elsewhere.
        Compare-and-set on the KV revision, retried when another node writes in between.

        A first claim (just after the connect) yields to an entry of another node only when that
        connection is newer by connect time (this claim may simply be late); a refresh yields to any
        entry of another node, which can only have been written after this node's first claim."""
        body = json.dumps({"node": self.node_id, "at": held.at}, separators=(",", ":")).encode()
        for _ in range(_CLAIM_ATTEMPTS):
            entry = await self._get(key)
            value = None if entry is None else _entry_value(entry)
            other = value.get("node") if value else None
            other_at = value.get("at") if value else None
            if isinstance(other, str) and other != self.node_id and (
                    not first or (isinstance(other_at, int) and other_at > held.at)):
                return Claim(superseded=True)
            try:
                if entry is None:
                    held.rev = await self.kv.create(key, body)
                else:
                    held.rev = await self.kv.update(key, body, last=entry.revision)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                continue  # another writer got in between: read again
            return Claim(previous=other if isinstance(other, str) and other != self.node_id else None)
        raise RuntimeError(f"presence key {key} keeps changing; claim given up")

    async def release(self, key: str, held: Held) -> None:
        """Delete the entry if it is still the one this connection wrote."""
        if held.rev is None:
            return
        try:
            await self.kv.delete(key, last=held.rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # another connection (here or elsewhere) holds it now
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) not in _WRONG_LAST:
                raise


class SessionKV:
    """Identity key → subscription kinds of its persistent session."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def store(self, key: str, kinds: frozenset[str]) -> None:
        if kinds:
            await self.kv.put(key, json.dumps(sorted(kinds)).encode())
            return
        if await self.load(key):  # forget: only write a delete marker when something is stored
            await self.kv.delete(key)

    async def load(self, key: str) -> frozenset[str]:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return frozenset()
        try:
            value = json.loads(entry.value or b"[]")
        except ValueError:
            return frozenset()
        return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else frozenset()
