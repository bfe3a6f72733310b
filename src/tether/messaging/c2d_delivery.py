"""Cloud-to-device delivery: moves a connected device's C2D queue to its connection, for every protocol.

One `C2DPump` per connected, subscribed device: it locks messages from `C2DService` (up to
`max_in_flight` at once, in queue order) or takes the ones a send locked for it, hands each to the
connection (`ConnectionHandle.send_c2d`) and settles it as the device did: COMPLETE is
group-committed (`complete_later`, nobody waits for it), REJECT dead-letters it, ABANDON makes it
visible again with its delivery count raised. When the connection drops before the device settled,
the message is abandoned (as Azure counts an unacknowledged MQTT delivery) and the pump stops. The
pump sleeps until the service's enqueue listener fires for its device (send, abandon, lock expiry)
or `poll_interval_s` passes (messages sent through another hub node). Messages queued while the
device was offline go out as soon as it subscribes.

How a message looks on the wire is the protocol's business (MQTT: `protocols.mqtt.devicebound`);
when to start and stop a device's pump is `messaging.device_sessions`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tether.errors import PreconditionFailed
from tether.messaging.c2d import C2DMessage, C2DOutcome, C2DService
from tether.messaging.presence import ConnectionHandle

__all__ = ["C2DPump", "C2DPumps", "DeliverC2D"]

log = logging.getLogger("tether.c2d.delivery")

DeliverC2D = Callable[[C2DMessage], Awaitable[C2DOutcome]]
"""`deliver(message)`: the device's settlement; `ConnectionError` when the connection ended first
(`ConnectionHandle.send_c2d`)."""

RETRY_AFTER_ERROR_S = 1.0


class C2DPump:
    """Moves one device's queue to its connection; `start()` once, `stop()` when the connection or
    the subscription ends (it also stops by itself once a delivery reports the connection gone).

    Two ways in: the pump's own receive loop locks what is queued (backlog, abandoned or expired
    locks, messages sent through another node), up to its free slots in one query; and, while it
    is idle (not receiving) with a free slot, `C2DService.send` locks a new message for it in the
    send's own write and hands it over in memory (`reserve`/`take`, the `C2DConsumer` protocol)."""

    def __init__(
        self,
        c2d: C2DService,
        device_id: str,
        deliver: DeliverC2D,
        *,
        max_in_flight: int = 8,
        poll_interval_s: float = 30.0,
    ) -> None:
        self._c2d = c2d
        self.device_id = device_id
        self._deliver_to_device = deliver
        self._max_in_flight = max(1, max_in_flight)
        self._in_flight = 0  # slots taken: reserved, or a delivery waiting for its settlement
        self._receiving = False
        self._slot_freed = asyncio.Event()
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Future[C2DMessage]] = set()  # shielded settles still being written

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
        """Stop receiving; deliveries still waiting for the device are abandoned, and the abandons (and
        other settlements under way) are written before this returns."""
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
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

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
        """Deliver in the order of the calls (tasks start in creation order); the slot is taken."""
        task = asyncio.create_task(self._deliver(message))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, message: C2DMessage) -> None:
        try:
            outcome: C2DOutcome | None
            try:
                outcome = await self._deliver_to_device(message)
            except asyncio.CancelledError:  # stop(): the settlement will not be waited for
                outcome = None
            except ConnectionError:
                outcome = None
            except Exception:
                log.exception("C2D delivery to %s failed", self.device_id)
                outcome = None
            if outcome is C2DOutcome.COMPLETE:
                self._c2d.complete_later(message)
            elif outcome is None:
                self._halt()  # the connection is gone: stop taking messages
                await self._settle(message, C2DOutcome.ABANDON)
            else:
                await self._settle(message, outcome)
        finally:
            self._free_slot()

    async def _settle(self, message: C2DMessage, outcome: str) -> None:
        """Settle (`reject`, `abandon`, `release`) even if the pump is being cancelled: the outcome
        must reach storage."""
        token = message.lock_token
        if token is None:
            return
        settle: Callable[[str, str], Awaitable[C2DMessage]] = getattr(self._c2d, outcome)
        write = asyncio.ensure_future(settle(self.device_id, token))
        self._settling.add(write)
        write.add_done_callback(self._settling.discard)
        try:
            await asyncio.shield(write)
        except PreconditionFailed:
            pass  # the lock expired meanwhile; the message was or will be redelivered
        except asyncio.CancelledError:
            pass  # the shielded settle continues on its own
        except Exception:
            log.exception("C2D %s of %s for %s failed", outcome, message.message_id, self.device_id)


class C2DPumps:
    """One pump per device of this process that has a C2D subscription on a live connection; a new
    connection's pump replaces the old one, and a pump stops when its connection closes."""

    def __init__(self, c2d: C2DService, *, max_in_flight: int = 8, poll_interval_s: float = 30.0) -> None:
        self._c2d = c2d
        self._max_in_flight = max_in_flight
        self._poll_interval_s = poll_interval_s
        self._pumps: dict[str, tuple[C2DPump, ConnectionHandle]] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._pumps)

    def get(self, device_id: str) -> C2DPump | None:
        entry = self._pumps.get(device_id)
        return None if entry is None else entry[0]

    async def start(self, device_id: str, handle: ConnectionHandle) -> C2DPump:
        """Deliver the device's queue over `handle` (idempotent for the same live connection)."""
        current = self._pumps.get(device_id)
        if current is not None:
            if current[1] is handle and current[0].running:
                return current[0]  # the same connection subscribed again
            await current[0].stop()
        pump = C2DPump(self._c2d, device_id, handle.send_c2d, max_in_flight=self._max_in_flight,
                       poll_interval_s=self._poll_interval_s)
        self._pumps[device_id] = (pump, handle)
        pump.start()
        watcher = asyncio.create_task(self._stop_when_closed(device_id, pump, handle.wait_closed))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return pump

    async def _stop_when_closed(
        self, device_id: str, pump: C2DPump, wait_closed: Callable[[], Awaitable[None]]
    ) -> None:
        await wait_closed()
        await self.stop(device_id, pump=pump)

    async def stop(self, device_id: str, *, pump: C2DPump | None = None,
                   handle: ConnectionHandle | None = None) -> None:
        """Stop the device's pump (only if it is still `pump` / still delivering over `handle`)."""
        current = self._pumps.get(device_id)
        if current is None or (pump is not None and current[0] is not pump) or (
                handle is not None and current[1] is not handle):
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
