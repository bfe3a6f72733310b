"""Cloud-to-device messaging: durable per-device queues with Azure's lifecycle, for every protocol.

States: Enqueued → Invisible (locked for one delivery: lock token, lock expiry) → Completed |
Rejected (dead-lettered) | Abandoned (back to Enqueued). A lock that expires makes the message
visible again; a message past its TTL is dead-lettered as Expired; one delivered more than
`max_delivery_count` times is dead-lettered as DeliveryCountExceeded. Outcomes produce the feedback
the sender asked for (`tether.messaging.feedback`).

Correctness never depends on the sweeper: `receive` skips (and dead-letters) expired messages and
treats expired locks as visible. The sweeper (`start()`/`close()`) makes Expired feedback timely and
wakes connected devices whose message became visible again through the enqueue listeners, which
also fire after an abandon and after every send not handed straight to a pump (below).

Cost per message (measurements in decision 0006): every write goes through one `GroupCommit`, so
concurrent operations share a commit (one fsync on SQLite) and never wait on each other in SQLite's
sleeping busy handler; a send to a connected device whose pump is idle is locked for that pump in
the send's own statement and handed over in memory (no receive query); PUBACK completions wait for
the next commit (at most `defer_s`); expiry is left to the sweeper (expired messages just stop
counting against the depth).

`Device.cloudToDeviceMessageCount` is not written back into the registry (that would change the
device etag on every send); `queue_depth()` gives the live number.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from tether.errors import BadRequest, NotFound, PreconditionFailed, QuotaExceeded
from tether.messaging.feedback import ACK_MODES, FeedbackService, wants_feedback
from tether.registry.models import DEVICE_ID_RE
from tether.security.authenticator import AuditSink
from tether.storage.sql.c2d import C2DMessage, NewC2DMessage, SqlC2DRepository
from tether.storage.sql.engine import Database

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_MESSAGE_BYTES",
    "MAX_TTL_S",
    "C2DConsumer",
    "C2DMessage",
    "C2DOutcome",
    "C2DService",
    "EnqueueListener",
    "GroupCommit",
]

log = logging.getLogger("tether.c2d")

MAX_MESSAGE_BYTES: Final = 65_536  # Azure: C2D message ≤ 64 KB
MAX_PROPERTIES_BYTES: Final = 8_192  # application properties, keys + values, UTF-8
MAX_TTL_S: Final = 172_800.0  # 48 h
DEFAULT_TTL_S: Final = 3_600.0
MAX_ID_LENGTH: Final = 128
# Azure's message id alphabet: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '
MESSAGE_ID_RE: Final = re.compile(r"[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}")
_PRINTABLE_RE: Final = re.compile(r"[\x20-\x7e]*")
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,128}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")

EnqueueListener = Callable[[str], Awaitable[None] | None]
T = TypeVar("T")


class C2DOutcome(enum.StrEnum):
    """How a device settled a delivered message (the value names the `C2DService` call): MQTT devices
    can only complete (PUBACK); AMQP devices complete (`accepted`), reject (`rejected`: dead-lettered)
    or abandon (`released`: visible again, the delivery counted)."""

    COMPLETE = "complete"
    REJECT = "reject"
    ABANDON = "abandon"


class C2DConsumer(Protocol):
    """A connection's delivery loop in this process (its `C2DPump`) that can take a message locked
    for it on enqueue, so a send to a connected device costs one write and no receive query."""

    def reserve(self) -> bool:
        """Take a delivery slot for a message about to be sent; False when busy (no capacity, or a
        receive of its own in flight) or stopping: the message is then queued as usual."""

    def unreserve(self) -> None:
        """Give the slot back (the message was not locked for this consumer)."""

    def take(self, message: C2DMessage) -> bool:
        """Deliver `message`, locked for this consumer, in the reserved slot; False when stopped."""


@dataclass(slots=True)
class _Pending:
    op: Callable[[AsyncConnection], Awaitable[Any]]
    future: asyncio.Future[Any] | None  # None: deferred, nobody waits
    done: Callable[[Any], None] | None = None


class GroupCommit:
    """Group commit for the C2D tables: writes that arrive while a transaction is being written share
    the next one, so concurrent sends, receives and settles cost one commit (one fsync on SQLite)
    instead of one each, and this process's C2D writers never contend through SQLite's busy handler
    (which sleeps 1–100 ms between retries). Deferred ops (completions nobody waits for) ride along
    with the next transaction, or get their own after `defer_s`. One failing op does not fail the
    others: the batch rolls back and every op is retried in its own transaction."""

    def __init__(self, db: Database, *, defer_s: float = 0.025, max_batch: int = 128) -> None:
        self._db = db
        self.defer_s = defer_s
        self.max_batch = max_batch
        self._urgent: deque[_Pending] = deque()
        self._deferred: list[_Pending] = []
        self._deferred_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._runner: asyncio.Task[None] | None = None
        self.commits = 0  # transactions written (diagnostics and tests)

    def run(self, op: Callable[[AsyncConnection], Awaitable[T]]) -> asyncio.Future[T]:
        """`op(conn)` in the next transaction; the future resolves once that transaction committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._urgent.append(_Pending(op, future))
        self._start()
        return future

    def defer(
        self, op: Callable[[AsyncConnection], Awaitable[T]], done: Callable[[T], None] | None = None
    ) -> None:
        """`op(conn)` with the next transaction, at the latest `defer_s` from now; `done(result)`
        after the commit (a failure is logged)."""
        self._deferred.append(_Pending(op, None, done))
        if self._runner is None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.defer_s, self._due)

    async def flush(self) -> None:
        """Write everything pending now, deferred ops included, and wait for it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._urgent or self._deferred or self._runner is not None:
            self._deferred_due = True
            self._start()
            if self._runner is not None:
                await asyncio.wait({self._runner})

    def _due(self) -> None:
        self._timer = None
        self._deferred_due = True
        self._start()

    def _start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._drain(), name="c2d-group-commit")

    async def _drain(self) -> None:
        try:
            while self._urgent or (self._deferred and self._deferred_due):
                batch: list[_Pending] = []
                while self._urgent and len(batch) < self.max_batch:
                    pending = self._urgent.popleft()
                    if pending.future is None or not pending.future.cancelled():  # caller gone: skip
                        batch.append(pending)
                batch += self._deferred
                self._deferred, self._deferred_due = [], False
                if batch:
                    await self._write(batch)
        finally:
            self._runner = None
            if self._deferred and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.defer_s, self._due)

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            async with self._db.write() as conn:
                results = [await pending.op(conn) for pending in batch]
        except Exception as exc:
            if len(batch) == 1:
                self._finish(batch[0], exc)
            else:  # isolate the failing op
                for pending in batch:
                    await self._write([pending])
            return
        except BaseException:
            for pending in batch:
                self._finish(pending, ConnectionError("C2D writer stopped"))
            raise
        self.commits += 1
        for pending, result in zip(batch, results, strict=True):
            self._finish(pending, result)

    @staticmethod
    def _finish(pending: _Pending, outcome: Any) -> None:
        future = pending.future
        if isinstance(outcome, BaseException):
            if future is None:
                log.error("deferred C2D write failed", exc_info=outcome)
            elif not future.done():
                future.set_exception(outcome)
            return
        if future is not None and not future.done():
            future.set_result(outcome)
        if pending.done is not None:
            try:
                pending.done(outcome)
            except Exception:
                log.exception("C2D write callback failed")


def _check_text(value: str | None, name: str, limit: int = MAX_ID_LENGTH) -> str | None:
    if value is None:
        return None
    if len(value) > limit or not _PRINTABLE_RE.fullmatch(value):
        raise BadRequest(f"{name} must be at most {limit} printable ASCII characters", field=name)
    return value


def _check_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """Names are HTTP tokens and values carry no control characters (Azure's rule), so every
    property fits an `iothub-app-{name}` header as well as an MQTT property bag."""
    size = 0
    for key, value in properties.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("application properties must be strings", field="properties")
        if not _TOKEN_RE.fullmatch(key) or _CONTROL_RE.search(value):
            raise BadRequest(f"property {key[:64]!r}: names are letters, digits and !#$%&'*+-.^_`|~, "
                             "values have no control characters", field="properties")
        if key.startswith("$.") or key.lower().startswith("iothub-"):
            raise BadRequest(f"property name {key!r} is reserved", field="properties")
        try:
            size += len(key.encode()) + len(value.encode())
        except UnicodeEncodeError:  # a lone surrogate (undecodable bytes, \udcxx): not text
            raise BadRequest(f"property {key[:64]!r}: not valid Unicode text", field="properties") from None
    if size > MAX_PROPERTIES_BYTES:
        raise BadRequest(f"application properties exceed {MAX_PROPERTIES_BYTES} bytes", field="properties")
    return dict(properties)


class C2DService:
    """Per-device C2D queues over SQL; one instance per hub process (every protocol shares it)."""

    def __init__(
        self,
        db: Database,
        *,
        audit: AuditSink | None = None,
        max_queue_depth: int = 50,
        max_delivery_count: int = 10,
        lock_timeout_s: float = 60.0,
        default_ttl_s: float = DEFAULT_TTL_S,
        sweep_interval_s: float = 5.0,
        feedback_lock_timeout_s: float = 60.0,
        feedback_ttl_s: float = 3_600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= max_delivery_count <= 100:
            raise ValueError("max_delivery_count must be 1-100")
        self.writer = GroupCommit(db)
        self.repo = SqlC2DRepository(db, wants_feedback, run=self.writer.run)
        self.feedback = FeedbackService(self.repo, lock_timeout_s=feedback_lock_timeout_s, clock=clock)
        self._audit = audit
        self.max_queue_depth = max_queue_depth
        self.max_delivery_count = max_delivery_count
        self.lock_timeout_s = lock_timeout_s
        self.default_ttl_s = default_ttl_s
        self.sweep_interval_s = sweep_interval_s
        self.feedback_ttl_s = feedback_ttl_s
        self._clock = clock
        self._listeners: list[EnqueueListener] = []
        self._device_listeners: dict[str, list[EnqueueListener]] = {}
        self._relays: list[EnqueueListener] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._consumers: dict[str, C2DConsumer] = {}
        self._completing: list[C2DMessage] | None = None  # completions waiting for the next commit

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the periodic sweeper (expiry feedback, lock release)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="c2d-sweeper")

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.writer.flush()  # deferred completions reach storage

    # --- listeners ----------------------------------------------------------------------------
    def add_enqueue_listener(self, cb: EnqueueListener, *, device_id: str | None = None) -> None:
        """`cb(device_id)` after a message became receivable (send, abandon, lock expiry); with
        `device_id`, only for that device (a connected session's pump), else for every device."""
        if device_id is None:
            self._listeners.append(cb)
        else:
            self._device_listeners.setdefault(device_id, []).append(cb)

    def add_enqueue_relay(self, cb: EnqueueListener) -> None:
        """Like a global enqueue listener, but not fired by `fire_from_peer`: the cluster bus tells
        the other hub nodes with it (they must not echo the news back)."""
        self._relays.append(cb)

    def fire_from_peer(self, device_id: str) -> None:
        """Another hub node queued (or made visible) a message for `device_id`: wake this process's
        listeners (the device's pump, if it is connected here)."""
        self._fire(device_id, relay=False)

    def remove_enqueue_listener(self, cb: EnqueueListener, *, device_id: str | None = None) -> None:
        if device_id is None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(cb)
            return
        callbacks = self._device_listeners.get(device_id)
        if callbacks is None:
            return
        with contextlib.suppress(ValueError):
            callbacks.remove(cb)
        if not callbacks:
            del self._device_listeners[device_id]

    def attach_consumer(self, device_id: str, consumer: C2DConsumer) -> None:
        """`consumer` delivers to the device's connection in this process (replaces any other)."""
        self._consumers[device_id] = consumer

    def detach_consumer(self, device_id: str, consumer: C2DConsumer) -> None:
        if self._consumers.get(device_id) is consumer:
            del self._consumers[device_id]

    def _fire(self, device_id: str, *, relay: bool = True) -> None:
        relays = self._relays if relay else ()
        for cb in (*self._listeners, *self._device_listeners.get(device_id, ()), *relays):
            try:
                result = cb(device_id)
            except Exception:
                log.exception("C2D enqueue listener failed")
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._background.add(task)
                task.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("C2D enqueue listener failed", exc_info=task.exception())

    # --- queue operations ---------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def send(
        self,
        device_id: str,
        body: bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        ack: str = "none",
        ttl_s: float | None = None,
        properties: Mapping[str, str] | None = None,
        user_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        actor: str,
    ) -> C2DMessage:
        """Queue a message for the device. 404 unknown device, 403 DeviceMaximumQueueDepthExceeded,
        400 for a body over 64 KB (MessageTooLarge), a TTL outside (0, 48 h], a bad ack or id."""
        if len(body) > MAX_MESSAGE_BYTES:
            raise BadRequest(f"message body exceeds {MAX_MESSAGE_BYTES} bytes", code="MessageTooLarge",
                             field="body")
        if ack not in ACK_MODES:
            raise BadRequest(f"ack must be one of {', '.join(ACK_MODES)}", field="ack")
        ttl = self.default_ttl_s if ttl_s is None else float(ttl_s)
        if not 0 < ttl <= MAX_TTL_S:
            raise BadRequest(f"ttl must be more than 0 and at most {int(MAX_TTL_S)} seconds", field="ttl")
        if message_id is None:
            message_id = str(uuid.uuid4())
        elif not MESSAGE_ID_RE.fullmatch(message_id):
            raise BadRequest("messageId must be 1-128 ASCII letters, digits or -:.+%_#*?!(),=@;$'",
                             field="messageId")
        new = NewC2DMessage(
            device_id=device_id,
            message_id=message_id,
            body=bytes(body),
            ack=ack,
            correlation_id=_check_text(correlation_id, "correlationId"),
            user_id=_check_text(user_id, "userId"),
            content_type=_check_text(content_type, "contentType"),
            content_encoding=_check_text(content_encoding, "contentEncoding", 64),
            properties=_check_properties(properties or {}),
        )
        if not DEVICE_ID_RE.fullmatch(device_id):
            raise NotFound(f"device {device_id!r} does not exist", code="DeviceNotFound")
        now = self._now_ms()
        # A connected device whose pump has room gets the message locked for it in the same write,
        # straight from memory; otherwise it is queued and the listeners wake whoever delivers it.
        consumer = self._consumers.get(device_id)
        lock_ms = int(self.lock_timeout_s * 1000) if consumer is not None and consumer.reserve() else None
        future = self.writer.run(partial(self.repo.enqueue_in, new=new, now_ms=now, lock_ms=lock_ms,
                                         expiry_ms=now + int(ttl * 1000), max_depth=self.max_queue_depth))
        if consumer is not None and lock_ms is not None:
            future.add_done_callback(partial(self._hand_over, consumer))
            result = await asyncio.shield(future)  # the hand-over happens even if the caller goes away
        else:
            result = await future
        if result is None:
            raise NotFound(f"device {device_id!r} does not exist", code="DeviceNotFound")
        if isinstance(result, int):
            raise QuotaExceeded(
                f"device {device_id!r} already has {result} queued messages (maximum {self.max_queue_depth})",
                code="DeviceMaximumQueueDepthExceeded",
            )
        await self._record("c2d.send", actor, device_id,
                           {"messageId": result.message_id, "ack": ack, "size": len(body)})
        if result.lock_token is None:
            self._fire(device_id)
        return result

    def _hand_over(self, consumer: C2DConsumer, future: asyncio.Future[C2DMessage | int | None]) -> None:
        message = None if future.cancelled() or future.exception() is not None else future.result()
        if not isinstance(message, C2DMessage) or message.lock_token is None:
            consumer.unreserve()
        elif not consumer.take(message):  # its connection closed meanwhile: queue it for the next one
            self._spawn(self._release_quietly(message.device_id, message.lock_token))

    async def _release_quietly(self, device_id: str, lock_token: str) -> None:
        with contextlib.suppress(PreconditionFailed):
            await self.release(device_id, lock_token)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._listener_done)

    async def receive(self, device_id: str, *, lock_timeout_s: float | None = None) -> C2DMessage | None:
        """Lock and return the oldest visible message, or None when there is none."""
        taken = await self.receive_batch(device_id, 1, lock_timeout_s=lock_timeout_s)
        return taken[0] if taken else None

    async def receive_batch(
        self, device_id: str, max_count: int, *, lock_timeout_s: float | None = None
    ) -> list[C2DMessage]:
        """Lock up to `max_count` of the oldest visible messages (each with its own lock token)."""
        lock_s = self.lock_timeout_s if lock_timeout_s is None else lock_timeout_s
        if lock_s <= 0:
            raise BadRequest("lock timeout must be positive", field="lockTimeout")
        taken = await self.repo.receive(
            device_id, now_ms=self._now_ms(), lock_ms=int(lock_s * 1000),
            max_delivery_count=self.max_delivery_count, limit=max(1, max_count),
        )
        self.feedback.notify()  # expired or exhausted messages may have been dead-lettered
        return taken

    async def complete(self, device_id: str, lock_token: str) -> C2DMessage:
        return await self._settle(device_id, lock_token, "complete")

    async def reject(self, device_id: str, lock_token: str) -> C2DMessage:
        return await self._settle(device_id, lock_token, "reject")

    async def abandon(self, device_id: str, lock_token: str) -> C2DMessage:
        message = await self._settle(device_id, lock_token, "abandon")
        self._fire(device_id)
        return message

    def complete_later(self, message: C2DMessage) -> None:
        """Complete a delivered message without waiting (an MQTT PUBACK: nobody is answered): it joins
        the next group commit, a send's or its own `writer.defer_s` later, with other completions in
        one statement. Should the hub die first, the message is delivered again (at least once)."""
        if self._completing is None:
            batch: list[C2DMessage] = []
            self._completing = batch

            async def op(conn: AsyncConnection) -> list[C2DMessage]:
                if self._completing is batch:
                    self._completing = None  # later completions start the next batch
                return await self.repo.complete_many_in(conn, batch, now_ms=self._now_ms())

            self.writer.defer(op, self._completed)
        self._completing.append(message)

    def _completed(self, done: list[C2DMessage]) -> None:
        if done:
            self.feedback.notify()

    async def release(self, device_id: str, lock_token: str) -> C2DMessage:
        """Unlock a message that was received but never sent (e.g. its connection closed first):
        back to Enqueued without counting the delivery."""
        message = await self._settle(device_id, lock_token, "release")
        self._fire(device_id)
        return message

    async def _settle(self, device_id: str, lock_token: str, outcome: str) -> C2DMessage:
        message = await self.repo.settle(device_id, lock_token, outcome, now_ms=self._now_ms())
        if message is None:
            raise PreconditionFailed(
                "the message lock is unknown, expired or already settled", code="DeviceMessageLockLost"
            )
        if outcome in ("complete", "reject"):
            self.feedback.notify()
        return message

    async def purge(self, device_id: str, *, actor: str = "system") -> int:
        """Delete every queued message of the device; Purged feedback for ack negative/full."""
        count = await self.repo.purge(device_id, now_ms=self._now_ms())
        if count is None:
            raise NotFound(f"device {device_id!r} does not exist", code="DeviceNotFound")
        self.feedback.notify()
        await self._record("c2d.purge", actor, device_id, {"purged": count})
        return count

    async def queue_depth(self, device_id: str) -> int:
        """Live `cloudToDeviceMessageCount`: messages queued and not expired."""
        return await self.repo.depth(device_id, now_ms=self._now_ms())

    # --- sweeper ------------------------------------------------------------------------------
    async def sweep(self) -> None:
        """One sweeper pass (also callable directly, e.g. from tests or a maintenance command)."""
        result = await self.repo.sweep(now_ms=self._now_ms(), feedback_ttl_ms=int(self.feedback_ttl_s * 1000))
        if result.expired:
            self.feedback.notify()
        for device_id in result.unlocked:
            self._fire(device_id)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:  # a transient DB error must not stop expiry for good
                log.exception("C2D sweep failed")

    async def _record(self, action: str, actor: str, device_id: str, details: dict[str, Any]) -> None:
        if self._audit is not None:
            await self._audit.record(action, "ok", principal=actor, target=device_id, details=details)
