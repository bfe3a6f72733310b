"""Delivery feedback for cloud-to-device messages: which outcomes a sender hears about, and the
durable feedback queue the service drains in locked batches.

A sender picks an ack mode per message: `positive` asks for Success (the device completed it),
`negative` for the failures (Expired, DeliveryCountExceeded, Rejected, Purged), `full` for both,
`none` for nothing. Records are written by the C2D repository in the same transaction as the
outcome; this service only hands them out: up to 64 per batch under one lock token, completed
(deleted) or abandoned (offered again) by the service; a batch not settled within the lock timeout
is offered again too, so feedback is delivered at least once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tether.errors import PreconditionFailed
from tether.storage.sql.c2d import FeedbackRecord, SqlC2DRepository

__all__ = [
    "ACK_MODES",
    "FAILURE_STATUSES",
    "FEEDBACK_CONTENT_TYPE",
    "MAX_BATCH",
    "FeedbackBatch",
    "FeedbackRecord",
    "FeedbackService",
    "wants_feedback",
]

ACK_MODES: Final = ("none", "positive", "negative", "full")
FAILURE_STATUSES: Final = frozenset({"Expired", "DeliveryCountExceeded", "Rejected", "Purged"})
FEEDBACK_CONTENT_TYPE: Final = "application/vnd.microsoft.iothub.feedback.json"
MAX_BATCH: Final = 64  # Azure's batch size
MAX_WAIT_S: Final = 60.0  # longest long-poll a caller may ask for
_RECHECK_S: Final = 1.0  # re-read the table this often while waiting (other hub nodes write too)


def wants_feedback(ack: str, status: str) -> bool:
    """Whether a message sent with `ack` produces a feedback record for outcome `status`."""
    if status == "Success":
        return ack in ("positive", "full")
    return status in FAILURE_STATUSES and ack in ("negative", "full")


@dataclass(frozen=True, slots=True)
class FeedbackBatch:
    lock_token: str
    records: list[FeedbackRecord]


class FeedbackService:
    """The service side of the feedback queue (REST today, AMQP `/messages/serviceBound/feedback` later)."""

    def __init__(
        self,
        repo: SqlC2DRepository,
        *,
        lock_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._repo = repo
        self.lock_timeout_s = lock_timeout_s
        self._clock = clock
        self._changed = asyncio.Event()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def notify(self) -> None:
        """Wake long-polling receivers: feedback may have been written (called by C2DService)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def receive(self, *, timeout_s: float = 0.0, max_records: int = MAX_BATCH) -> FeedbackBatch | None:
        """Lock the next batch; with `timeout_s` > 0 wait up to that long for one (max 60 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout_s, 0.0), MAX_WAIT_S)
        max_records = max(1, min(max_records, MAX_BATCH))
        while True:
            changed = self._changed
            found = await self._repo.feedback_lock(
                max_records=max_records, now_ms=self._now_ms(), lock_ms=int(self.lock_timeout_s * 1000)
            )
            if found is not None:
                return FeedbackBatch(found[0], found[1])
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, _RECHECK_S))
            except TimeoutError:
                pass

    async def complete(self, lock_token: str) -> None:
        """Delete the batch; 412 when its lock is unknown or expired."""
        if not await self._repo.feedback_settle(lock_token, complete=True, now_ms=self._now_ms()):
            raise _lock_lost()

    async def abandon(self, lock_token: str) -> None:
        """Offer the batch again at once; 412 when its lock is unknown or expired."""
        if not await self._repo.feedback_settle(lock_token, complete=False, now_ms=self._now_ms()):
            raise _lock_lost()
        self.notify()

    async def pending(self) -> int:
        """Feedback records not yet completed (locked ones included)."""
        return await self._repo.feedback_count()


def _lock_lost() -> PreconditionFailed:
    return PreconditionFailed("feedback lock token is unknown or its lock expired", code="FeedbackLockLost")
