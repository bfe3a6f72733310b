"""The one audit writer: every security-relevant event (authentication, registry and policy changes)
goes through `AuditLog.record()` into the audit repository.

Writes are batched so an authentication-failure flood costs one transaction per batch, not one per
record: records wait at most `max_delay_s` (50 ms) for a single background flusher, or are written at
once when `max_batch` (200) are pending. The buffer is bounded and never drops anything: when it is
full, `record()` waits for the flush (backpressure). `flush()`, `query()` and `close()` write
everything recorded so far first. Free-text fields are truncated, and values under secret-looking
keys in `details` are redacted, so a hostile client cannot bloat the log or get a secret stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Protocol

from tether.registry.models import utcnow
from tether.storage.base import AuditRecord, AuditRepository

log = logging.getLogger(__name__)

MAX_FIELD_CHARS = 512
_SECRET_KEYS = frozenset(
    {"key", "primarykey", "secondarykey", "sharedaccesskey", "token", "password", "sig", "signature",
     "secret", "authorization"}
)
REDACTED = "<redacted>"
_ACTOR: ContextVar[tuple[str, dict[str, Any]] | None] = ContextVar("tether_audit_actor", default=None)


@contextlib.contextmanager
def acting_as(principal: str, details: dict[str, Any]) -> Iterator[None]:
    """While the block runs (one REST request), every record naming `principal` also carries
    `details` — how the change records of a person's call name their issuer without every service
    knowing about operators."""
    token = _ACTOR.set((principal, details))
    try:
        yield
    finally:
        _ACTOR.reset(token)


def _clip(value: str | None) -> str | None:
    """Bounded, storable text: NUL and unencodable characters (which PostgreSQL would refuse, jamming
    the batch) are escaped; long values are cut."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    if not value.isascii():
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) <= MAX_FIELD_CHARS:
        return value
    return value[: MAX_FIELD_CHARS - 1] + "…"


def _scrub(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy of `details` with secrets redacted and long strings clipped."""
    if depth > 8:
        return "…"
    if isinstance(value, dict):
        return {_clip(str(k)) or "": REDACTED if str(k).lower() in _SECRET_KEYS else _scrub(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_scrub(v, depth + 1) for v in items]
    if isinstance(value, str):
        return _clip(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clip(str(value))


class AuditSink(Protocol):
    """What a component needs of the audit log (AuditLog satisfies it structurally)."""

    async def record(
        self,
        action: str,
        outcome: str,
        *,
        principal: str | None = None,
        credential: str | None = None,
        reason: str | None = None,
        peer: str | None = None,
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None: ...


class AuditLog:
    """Buffered, durable audit trail over an `AuditRepository`."""

    def __init__(self, repo: AuditRepository, *, max_batch: int = 200, max_delay_s: float = 0.05) -> None:
        self._repo = repo
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._buffer: list[AuditRecord] = []
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._flusher_sleeping = False
        self._closed = False

    async def record(
        self,
        action: str,
        outcome: str,
        *,
        principal: str | None = None,
        credential: str | None = None,
        reason: str | None = None,
        peer: str | None = None,
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        bound = _ACTOR.get()
        if bound is not None and principal == bound[0]:
            details = {**bound[1], **(details or {})}
        rec = AuditRecord(
            time=utcnow(),
            action=_clip(action) or "",
            outcome=_clip(outcome) or "",
            principal=_clip(principal),
            credential=_clip(credential),
            reason=_clip(reason),
            peer=_clip(peer),
            target=_clip(target),
            details=_scrub(details) if details else {},
        )
        if self._closed:
            await self._repo.append([rec])  # late stragglers are still written, synchronously
            return
        while len(self._buffer) >= self._max_batch:
            await self._write(full_batches_only=True)  # backpressure: wait, never drop
        self._buffer.append(rec)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon(), name="audit-flusher")

    async def flush(self) -> None:
        """Write every record buffered so far; raises (keeping the records) if the repository fails."""
        await self._write(full_batches_only=False)

    async def _write(self, *, full_batches_only: bool) -> None:
        """One writer at a time. Records stay counted in the buffer until written, so the bound holds
        while a batch is in flight. Under a flood the waiting recorders find the buffer refilled and
        write full batches, rather than each committing a handful of records."""
        async with self._flush_lock:
            remaining = len(self._buffer)  # only what is here now: a flood cannot keep flush() busy
            while remaining > 0 and (not full_batches_only or len(self._buffer) >= self._max_batch):
                batch = self._buffer[: min(self._max_batch, remaining)]
                await self._repo.append(batch)
                del self._buffer[: len(batch)]
                remaining -= len(batch)

    async def query(
        self,
        *,
        limit: int = 100,
        since: datetime | None = None,
        outcome: str | None = None,
        action_prefix: str | None = None,
        principal: str | None = None,
    ) -> list[AuditRecord]:
        """Newest first; includes everything recorded before the call."""
        await self.flush()
        return await self._repo.query(
            limit=limit, since=since, outcome=outcome, action_prefix=action_prefix, principal=principal
        )

    async def close(self) -> None:
        self._closed = True
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            # Cancel it only while it sleeps: cancelling a write could lose track of a committed batch.
            if self._flusher_sleeping:
                flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        await self.flush()

    async def _flush_soon(self) -> None:
        """The single background flusher: runs while records are pending, retrying on errors."""
        delay = self._max_delay_s
        while self._buffer and not self._closed:
            self._flusher_sleeping = True
            try:
                await asyncio.sleep(delay)
            finally:
                self._flusher_sleeping = False
            try:
                await self.flush()
                delay = self._max_delay_s
            except Exception:
                log.exception("audit flush failed; %d records kept for retry", len(self._buffer))
                delay = min(delay * 2, 5.0)


__all__ = ["AuditLog", "AuditSink", "acting_as"]
