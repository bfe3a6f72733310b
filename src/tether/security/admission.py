"""Socket admission: the process's file descriptors are a resource an unauthenticated peer can consume,
so every accepted socket of every listener takes a `Slot` from one `ConnectionSlots` first.

* **Descriptor limit.** `raise_descriptor_limit()` (called once by `tether run`) raises the soft
  `RLIMIT_NOFILE` to the hard limit; `socket_capacity()` is what remains for sockets once a reserve
  (`limits.fd_reserve`) is kept for everything else the process opens — database files and
  connections, stream segments, helper-process pipes, certificate reloads, audit exports. With that
  reserve the process itself never runs out of descriptors because of its peers, so established
  devices keep working.
* **Per-peer cap.** At most `limits.max_connections_per_peer` sockets per peer address (IPv6: per /64,
  the throttle's key): one host cannot take every slot.
* **Shedding.** When every slot is taken, a new socket makes room by closing the connection that has
  been unproductive the longest: still in its TLS handshake, no MQTT CONNECT accepted yet, or an HTTP
  connection with no request in progress (idle keep-alive, half a request head). Authenticated MQTT
  sessions and HTTP requests in progress are never shed. Only when nothing can be shed is the new
  socket refused. So a flood of idle or slow connections cannot keep `/healthz` or a device out.

Every listener (`tether.security.listener`) asks `open()` before it creates a protocol; the protocol
`attach()`es a closer once it has a transport, marks work in progress with `hold()`/`unhold()` (HTTP
requests) or `established` (MQTT: authenticated), and `release()`s the slot when the connection is
lost. Refusals and sheddings are counted for `/metrics` at once and handed to the audit log in
aggregate (`take_report()`, one record per reason per second at most).
"""

from __future__ import annotations

import logging
import os
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tether.observability.metrics import CONNECTIONS_REFUSED, SOCKETS
from tether.security.throttle import peer_key

__all__ = [
    "CAPACITY",
    "EVICTED",
    "MAX_SOFT_LIMIT",
    "PER_PEER",
    "AdmissionReport",
    "ConnectionSlots",
    "Slot",
    "open_descriptors",
    "raise_descriptor_limit",
    "socket_capacity",
]

log = logging.getLogger(__name__)

PER_PEER = "per-peer-limit"
CAPACITY = "no-free-descriptor"
EVICTED = "shed-idle"
MAX_SOFT_LIMIT = 1 << 20  # a hard limit of "unlimited" (2^30 and more) is not worth a soft limit that high
_REPORT_PEERS = 10  # peers named per aggregated audit record


def raise_descriptor_limit(maximum: int = MAX_SOFT_LIMIT) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most `maximum`); returns (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else maximum
    target = min(target, maximum)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. a sandbox refusing it
            log.warning("could not raise the file descriptor limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def open_descriptors() -> int:
    """Descriptors this process has open now (Linux /proc; elsewhere a conservative guess)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def socket_capacity(reserve: int, *, limit: int | None = None, in_use: int | None = None) -> int:
    """Sockets the listeners may hold: the soft limit minus what is open now minus the reserve."""
    if limit is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = MAX_SOFT_LIMIT if soft == resource.RLIM_INFINITY else int(soft)
    used = open_descriptors() if in_use is None else in_use
    return max(1, limit - used - reserve)


class Slot:
    """One accepted socket's place (see the module docstring)."""

    __slots__ = ("_closer", "_holds", "_owner", "established", "key", "listener", "peer", "released")

    def __init__(self, owner: ConnectionSlots, listener: str, peer: str | None, key: str) -> None:
        self._owner = owner
        self.listener = listener
        self.peer = peer
        self.key = key
        self._closer: Callable[[], None] | None = None
        self._holds = 0
        self.released = False
        # Set by protocols whose connections become productive once (MQTT: authenticated).
        self.established: Callable[[], bool] | None = None

    def attach(self, closer: Callable[[], None]) -> None:
        """The connection exists (`closer` aborts it); from now on it may be shed while unproductive."""
        self._closer = closer
        if not self.released and self._holds == 0:
            self._owner._idle[self] = None

    def hold(self) -> None:
        """Work in progress (an HTTP request): not to be shed until `unhold()`."""
        self._holds += 1
        if self._holds == 1:
            self._owner._idle.pop(self, None)

    def unhold(self) -> None:
        self._holds -= 1
        if self._holds == 0 and not self.released and self._closer is not None:
            self._owner._idle[self] = None  # the most recently active idle connection

    def release(self) -> None:
        """The connection is gone (idempotent)."""
        self._owner._release(self)

    def _productive(self) -> bool:
        return self._holds > 0 or (self.established is not None and self.established())


@dataclass(frozen=True, slots=True)
class AdmissionReport:
    """Refused or shed sockets since the last report, for one aggregated audit record."""

    reason: str
    count: int
    peers: tuple[tuple[str, int], ...]  # the peer addresses (IPv6: /64) with the most, at most 10


@dataclass(slots=True)
class _Tally:
    count: int = 0
    peers: dict[str, int] = field(default_factory=dict)

    def add(self, key: str) -> None:
        self.count += 1
        if key in self.peers or len(self.peers) < 1000:
            self.peers[key] = self.peers.get(key, 0) + 1


class ConnectionSlots:
    """Descriptor budget and per-peer caps for every listener of the process."""

    def __init__(self, capacity: int, per_peer: int, *, ipv6_prefix: int = 64) -> None:
        if capacity < 1 or per_peer < 1:
            raise ValueError("capacity and per_peer must be at least 1")
        self._capacity = capacity
        self.per_peer = per_peer
        self.ipv6_prefix = ipv6_prefix
        self.open_count = 0
        self._idle: OrderedDict[Slot, None] = OrderedDict()  # oldest unproductive first
        self._peers: dict[str, int] = {}
        self._tallies: dict[str, _Tally] = {}
        SOCKETS.labels("open").set_function(lambda: self.open_count)
        SOCKETS.labels("capacity").set_function(lambda: self._capacity)

    def __len__(self) -> int:
        return self.open_count

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = max(1, value)

    def peer_count(self, peer: str) -> int:
        return self._peers.get(peer_key(peer, ipv6_prefix=self.ipv6_prefix), 0)

    def open(self, listener: str, peer: str | None) -> Slot | None:
        """A slot for a new socket from `peer`, shedding an unproductive connection if the budget is
        spent; None: refuse the socket (close it at once)."""
        key = peer_key(peer, ipv6_prefix=self.ipv6_prefix) if peer else "-"
        if self._peers.get(key, 0) >= self.per_peer:
            self._refused(listener, PER_PEER, key)
            return None
        if self.open_count >= self._capacity and not self._shed():
            self._refused(listener, CAPACITY, key)
            return None
        slot = Slot(self, listener, peer, key)
        self.open_count += 1
        self._peers[key] = self._peers.get(key, 0) + 1
        return slot

    def take_report(self) -> list[AdmissionReport]:
        tallies, self._tallies = self._tallies, {}
        return [AdmissionReport(reason, t.count, tuple(sorted(t.peers.items(), key=lambda p: -p[1])[
            :_REPORT_PEERS])) for reason, t in sorted(tallies.items())]

    def _shed(self) -> bool:
        """Close the oldest unproductive connection; False when there is none."""
        idle = self._idle
        while idle:
            slot, _ = idle.popitem(last=False)
            if slot._productive():
                continue  # an authenticated session: it leaves the candidates for good
            closer = slot._closer
            self._release(slot)
            self._refused(slot.listener, EVICTED, slot.key)
            if closer is not None:
                closer()
            return True
        return False

    def _refused(self, listener: str, reason: str, key: str) -> None:
        self._tallies.setdefault(reason, _Tally()).add(key)
        CONNECTIONS_REFUSED.labels(listener, reason).inc()

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self._idle.pop(slot, None)
        self.open_count -= 1
        left = self._peers.get(slot.key, 1) - 1
        if left > 0:
            self._peers[slot.key] = left
        else:
            self._peers.pop(slot.key, None)

