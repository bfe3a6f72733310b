"""Delivers a device's C2D queue over its MQTT connection.

One `C2DPump` per subscribed device: it locks messages from `C2DService` (up to `max_in_flight`
at once, in queue order) or takes the ones a send locked for it, publishes each at QoS 1 on
`devices/{id}/messages/devicebound/{bag}`, completes it when the device PUBACKs (group-committed,
nobody waits for it) and abandons it when the connection drops first (so the delivery count
rises, as Azure's does for unacknowledged MQTT deliveries). MQTT has no reject or
abandon of its own: a device can only complete. The pump sleeps until the service's enqueue
listener fires for its device (send, abandon, lock expiry) or `poll_interval_s` passes (messages
sent through another hub node). Messages queued while the device was offline go out as soon as
it subscribes.

`C2DPumps` keeps one pump per connected device and `C2DHooks` plugs it into the session's
`TwinMethodHooks.subscribed` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tether.errors import PreconditionFailed
from tether.messaging.c2d import C2DMessage, C2DService
from tether.messaging.presence import ConnectionHandle
from tether.protocols.mqtt.context import TwinMethodHooks
from tether.protocols.mqtt.topics import SubscriptionKind, TopicError, c2d_topic
from tether.security.principal import Principal

__all__ = ["C2DHooks", "C2DPump", "C2DPumps", "Publish", "c2d_message_topic", "publish_via"]

log = logging.getLogger("tether.mqtt.c2d")

Publish = Callable[[str, bytes], Awaitable[bool]]
"""`publish(topic, payload)`: QoS 1 PUBLISH; True once PUBACKed, False if the connection dropped."""

RETRY_AFTER_ERROR_S = 1.0


def c2d_message_topic(message: C2DMessage) -> str:
    """The topic carrying `message`, with the properties azure-iot-device reads back into its
    `Message` (`$.mid` message_id, `$.cid` correlation_id, `$.uid` user_id, `$.ct` content_type,
    `$.ce` content_encoding, `$.exp` expiry_time_utc, `iothub-ack` ack, the rest custom_properties)."""
    system = {"$.mid": message.message_id, "$.to": f"/devices/{message.device_id}/messages/deviceBound"}
    if message.correlation_id:
        system["$.cid"] = message.correlation_id
    if message.user_id:
        system["$.uid"] = message.user_id
    if message.content_type:
        system["$.ct"] = message.content_type
    if message.content_encoding:
        system["$.ce"] = message.content_encoding
    system["$.exp"] = message.expiry_time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    app = dict(message.properties)
    if message.ack != "none":
        app["iothub-ack"] = message.ack
    return c2d_topic(message.device_id, system, app)


class C2DPump:
    """Moves one device's queue to its connection; `start()` once, `stop()` when the connection or
    the subscription ends (it also stops by itself once a publish reports the connection gone).

    Two ways in: the pump's own receive loop locks what is queued (backlog, abandoned or expired
    locks, messages sent through another node), up to its free slots in one query; and, while it
    is idle (not receiving) with a free slot, `C2DService.send` locks a new message for it in the
    send's own write and hands it over in memory (`reserve`/`take`, the `C2DConsumer` protocol).
    PUBACKs are completed with `C2DService.complete_later` (group-committed, nobody waits)."""

    def __init__(
        self,
        c2d: C2DService,
        device_id: str,
        publish: Publish,
        *,
        max_in_flight: int = 8,
        poll_interval_s: float = 30.0,
    ) -> None:
        self._c2d = c2d
        self.device_id = device_id
        self._publish = publish
        self._max_in_flight = max(1, max_in_flight)
        self._in_flight = 0  # slots taken: reserved, or a delivery waiting for its PUBACK
        self._receiving = False
        self._slot_freed = asyncio.Event()
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    def start(self) -> None:
        if self._runner is not None:
            return
        self._c2d.add_enqueue_listener(self._on_enqueue, device_id=self.device_id)
        self._c2d.attach_consumer(self.device_id, self)
        self._runner = asyncio.create_task(self._run(), name=f"c2d-pump:{self.device_id}")

    async def stop(self) -> None:
        """Stop receiving; deliveries still waiting for a PUBACK are abandoned."""
        self._halt()
        self._c2d.remove_enqueue_listener(self._on_enqueue, device_id=self.device_id)
        runner = self._runner
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        deliveries = list(self._deliveries)
        for task in deliveries:
            task.cancel()
        if deliveries:
            await asyncio.gather(*deliveries, return_exceptions=True)

    def _halt(self) -> None:
        self._stopping = True
        self._c2d.detach_consumer(self.device_id, self)
        self._wake.set()
        self._slot_freed.set()

    # --- C2DConsumer: messages locked for this pump by a send -----------------------------------
    def reserve(self) -> bool:
        if self._stopping or self._receiving or self._in_flight >= self._max_in_flight:
            return False
        self._in_flight += 1
        return True

    def unreserve(self) -> None:
        self._free_slot()

    def take(self, message: C2DMessage) -> bool:
        if self._stopping:
            self._free_slot()
            return False
        self._start_delivery(message)
        return True

    def _free_slot(self) -> None:
        self._in_flight -= 1
        self._slot_freed.set()

    def _on_enqueue(self, device_id: str) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            free = self._max_in_flight - self._in_flight
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wake.clear()
            self._receiving = True
            try:
                messages = await self._c2d.receive_batch(self.device_id, free)
            except Exception:
                log.exception("C2D receive for %s failed", self.device_id)
                messages = None
            finally:
                self._receiving = False
            if messages is None:
                await asyncio.sleep(RETRY_AFTER_ERROR_S)
                continue
            if self._stopping:  # the connection went away while we were locking them
                for message in messages:
                    await self._settle(message, "release")
                return
            for message in messages:
                self._in_flight += 1
                self._start_delivery(message)
            if len(messages) < free:  # drained: sleep until a send, an abandon or a lock expiry
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)

    def _start_delivery(self, message: C2DMessage) -> None:
        """Publish in the order of the calls (tasks start in creation order); the slot is taken."""
        task = asyncio.create_task(self._deliver(message))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, message: C2DMessage) -> None:
        try:
            try:
                topic = c2d_message_topic(message)
            except TopicError:  # text no MQTT topic can carry: it would never be deliverable
                log.warning("C2D message %s for %s cannot be encoded in a topic; rejected",
                            message.message_id, self.device_id)
                await self._settle(message, "reject")
                return
            try:
                delivered = await self._publish(topic, message.body)
            except asyncio.CancelledError:  # stop(): the PUBACK will not be waited for
                delivered = False
            except Exception:
                log.exception("C2D publish to %s failed", self.device_id)
                delivered = False
            if delivered:
                self._c2d.complete_later(message)
                return
            self._halt()  # the connection is gone: stop taking messages
            await self._settle(message, "abandon")
        finally:
            self._free_slot()

    async def _settle(self, message: C2DMessage, outcome: str) -> None:
        """Settle even if the pump is being cancelled: the outcome must reach storage."""
        token = message.lock_token
        if token is None:
            return
        settle: Callable[[str, str], Awaitable[C2DMessage]] = getattr(self._c2d, outcome)
        try:
            await asyncio.shield(settle(self.device_id, token))
        except PreconditionFailed:
            pass  # the lock expired meanwhile; the message was or will be redelivered
        except asyncio.CancelledError:
            pass  # the shielded settle continues on its own
        except Exception:
            log.exception("C2D %s of %s for %s failed", outcome, message.message_id, self.device_id)


def publish_via(handle: ConnectionHandle) -> Publish:
    """A `Publish` over a session's `ConnectionHandle.deliver` (QoS 1; ConnectionError → False)."""

    async def publish(topic: str, payload: bytes) -> bool:
        try:
            await handle.deliver(topic, payload, qos=1)
        except ConnectionError:
            return False
        return True

    return publish


class C2DPumps:
    """One pump per subscribed device of this process; a new connection's pump replaces the old."""

    def __init__(self, c2d: C2DService, *, max_in_flight: int = 8, poll_interval_s: float = 30.0) -> None:
        self._c2d = c2d
        self._max_in_flight = max_in_flight
        self._poll_interval_s = poll_interval_s
        self._pumps: dict[str, tuple[C2DPump, ConnectionHandle]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._subscribed: set[str] = set()  # devices whose MQTT session holds a C2D subscription

    def __len__(self) -> int:
        return len(self._pumps)

    def get(self, device_id: str) -> C2DPump | None:
        entry = self._pumps.get(device_id)
        return None if entry is None else entry[0]

    async def subscribed(
        self, principal: Principal, handle: ConnectionHandle, kinds: Sequence[SubscriptionKind]
    ) -> None:
        """The session's subscribe hook: start delivering when the device subscribed to C2D."""
        if "c2d" in kinds and principal.device_id and not principal.module_id:
            self._subscribed.add(principal.device_id)
            await self.start(principal.device_id, handle)

    async def connected(self, principal: Principal, handle: ConnectionHandle, *, clean_session: bool) -> None:
        """The session's connect hook. With `clean_session=0` Azure keeps the C2D subscription of
        the previous connection and the device SDK does not subscribe again (e.g. after its token
        renewal reconnect), so delivery resumes at once; a clean session forgets it. Remembered
        per process: after a hub restart the device's next SUBSCRIBE starts delivery."""
        device_id = principal.device_id
        if not device_id or principal.module_id:
            return
        if clean_session:
            self._subscribed.discard(device_id)
        elif device_id in self._subscribed:
            await self.start(device_id, handle)

    def forget(self, device_id: str) -> None:
        """Drop the remembered subscription (the device was deleted)."""
        self._subscribed.discard(device_id)

    async def start(self, device_id: str, handle: ConnectionHandle) -> C2DPump:
        current = self._pumps.get(device_id)
        if current is not None:
            if current[1] is handle and current[0].running:
                return current[0]  # the same connection subscribed again
            await current[0].stop()
        pump = C2DPump(self._c2d, device_id, publish_via(handle), max_in_flight=self._max_in_flight,
                       poll_interval_s=self._poll_interval_s)
        self._pumps[device_id] = (pump, handle)
        pump.start()
        wait_closed: Any = getattr(handle, "wait_closed", None)
        if callable(wait_closed):
            watcher = asyncio.create_task(self._stop_when_closed(device_id, pump, wait_closed))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
        return pump

    async def _stop_when_closed(
        self, device_id: str, pump: C2DPump, wait_closed: Callable[[], Awaitable[None]]
    ) -> None:
        await wait_closed()
        await self.stop(device_id, pump)

    async def stop(self, device_id: str, pump: C2DPump | None = None) -> None:
        """Stop the device's pump (only if it is still `pump`, when given)."""
        current = self._pumps.get(device_id)
        if current is None or (pump is not None and current[0] is not pump):
            return
        del self._pumps[device_id]
        await current[0].stop()

    async def close(self) -> None:
        watchers = list(self._watchers)
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        pumps = [entry[0] for entry in self._pumps.values()]
        self._pumps.clear()
        await asyncio.gather(*(p.stop() for p in pumps), return_exceptions=True)


class C2DHooks:
    """Wraps the twin/method hooks so a C2D subscription also starts the device's pump:
    `hub.twin_hooks = C2DHooks(twin_hooks, pumps)` before the MQTT listeners start."""

    def __init__(self, inner: TwinMethodHooks, pumps: C2DPumps) -> None:
        self.inner = inner
        self.pumps = pumps

    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        return await self.inner.twin_get(principal)

    async def twin_patch_reported(self, principal: Principal, body: bytes) -> tuple[int, bytes, int | None]:
        return await self.inner.twin_patch_reported(principal, body)

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        await self.inner.method_response(principal, rid, status, body)

    async def subscribed(
        self, principal: Principal, handle: ConnectionHandle, kinds: Sequence[SubscriptionKind]
    ) -> None:
        await self.pumps.subscribed(principal, handle, kinds)
        await self.inner.subscribed(principal, handle, kinds)
