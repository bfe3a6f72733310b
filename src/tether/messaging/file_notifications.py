"""File-upload notifications for the service: what `/messages/serviceBound/filenotifications` delivers.

Azure tells the back end about each completed device file upload with one JSON object (`deviceId`,
`blobUri`, `blobName`, `lastUpdatedTime`, `blobSizeInBytes`, `enqueuedTimeUtc`). File upload itself
is not built yet: its feature calls `publish()`; receivers (the AMQP link today) `receive()` one
notification under a lock token and `complete()` or `abandon()` it; a lock not settled within the
lock timeout is offered again, so delivery is at least once.

The queue lives in this process and is bounded (`max_pending`, oldest dropped first, counted in
`dropped`): durable storage comes with the file-upload feature that fills it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tether.errors import PreconditionFailed

__all__ = ["FILE_NOTIFICATION_CONTENT_TYPE", "FileNotification", "FileNotificationService"]

FILE_NOTIFICATION_CONTENT_TYPE: Final = "application/json"
MAX_WAIT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class FileNotification:
    lock_token: str
    body: bytes  # the notification's JSON
    device_id: str


class FileNotificationService:
    """The service side of the file-notification queue (see the module docstring)."""

    def __init__(self, *, lock_timeout_s: float = 60.0, max_pending: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lock_timeout_s = lock_timeout_s
        self.max_pending = max_pending
        self._clock = clock
        self._queue: OrderedDict[str, tuple[bytes, str]] = OrderedDict()  # id → (body, device)
        self._locked: dict[str, tuple[str, bytes, str, float]] = {}  # lock → (id, body, device, until)
        self._changed = asyncio.Event()
        self.dropped = 0

    def publish(self, notification: Mapping[str, Any]) -> None:
        """Queue one notification (called by the file-upload feature when an upload completed)."""
        body = json.dumps(dict(notification), separators=(",", ":")).encode()
        if len(self._queue) >= self.max_pending:
            self._queue.popitem(last=False)
            self.dropped += 1
        self._queue[uuid.uuid4().hex] = (body, str(notification.get("deviceId", "")))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _release_expired(self) -> None:
        now = self._clock()
        for lock, (key, body, device, until) in list(self._locked.items()):
            if until <= now:
                del self._locked[lock]
                self._queue[key] = (body, device)
                self._queue.move_to_end(key, last=False)

    async def receive(self, *, timeout_s: float = 0.0) -> FileNotification | None:
        """Lock the oldest notification; with `timeout_s` > 0 wait up to that long for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout_s, 0.0), MAX_WAIT_S)
        while True:
            self._release_expired()
            if self._queue:
                key, (body, device) = self._queue.popitem(last=False)
                lock = uuid.uuid4().hex
                self._locked[lock] = (key, body, device, self._clock() + self.lock_timeout_s)
                return FileNotification(lock, body, device)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass

    async def complete(self, lock_token: str) -> None:
        if self._locked.pop(lock_token, None) is None:
            raise PreconditionFailed("file notification lock is unknown or expired",
                                     code="FileNotificationLockLost")

    async def abandon(self, lock_token: str) -> None:
        locked = self._locked.pop(lock_token, None)
        if locked is None:
            raise PreconditionFailed("file notification lock is unknown or expired",
                                     code="FileNotificationLockLost")
        key, body, device, _ = locked
        self._queue[key] = (body, device)
        self._queue.move_to_end(key, last=False)
        self._wake()

    def pending(self) -> int:
        return len(self._queue) + len(self._locked)
