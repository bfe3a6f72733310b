"""Socket admission (`tether.security.admission`): the descriptor budget, per-peer caps, shedding of the
longest-unproductive connection, and the aggregated report for the audit log."""

from __future__ import annotations

import pytest

from tether.security.admission import CAPACITY, EVICTED, PER_PEER, ConnectionSlots, Slot, socket_capacity


class Conn:
    """A stand-in connection: records that the admission closed it."""

    def __init__(self, slots: ConnectionSlots, peer: str) -> None:
        slot = slots.open("https", peer)
        assert slot is not None
        self.slot: Slot = slot
        self.closed = False
        slot.attach(self.close)

    def close(self) -> None:
        self.closed = True


def test_capacity_is_the_limit_minus_what_is_open_minus_the_reserve() -> None:
    assert socket_capacity(256, limit=1024, in_use=40) == 728
    assert socket_capacity(256, limit=200, in_use=40) == 1  # never zero: one socket at a time still works
    assert socket_capacity(16) >= 1


def test_each_peer_gets_at_most_its_cap_across_listeners() -> None:
    slots = ConnectionSlots(capacity=100, per_peer=3)
    held = [slots.open("mqtt" if n % 2 else "https", f"192.0.2.1:{n}") for n in range(3)]
    assert all(held) and slots.open("mqtts", "192.0.2.1:9") is None
    assert slots.open("https", "192.0.2.2:1") is not None  # another address
    assert slots.open("https", "[2001:db8::1]:1") and slots.open("https", "[2001:db8::2]:1")
    assert slots.open("https", "[2001:db8::3]:1")
    assert slots.open("https", "[2001:db8::4]:1") is None  # one /64
    assert held[0] is not None
    held[0].release()
    held[0].release()  # idempotent
    assert slots.open("https", "192.0.2.1:10") is not None
    [report] = [r for r in slots.take_report() if r.reason == PER_PEER]
    assert report.count == 2 and dict(report.peers) == {"192.0.2.1": 1, "2001:db8::/64": 1}
    assert slots.take_report() == []


def test_a_full_budget_sheds_the_longest_idle_connection_never_a_busy_one() -> None:
    slots = ConnectionSlots(capacity=3, per_peer=100)
    oldest, busy, device = Conn(slots, "10.0.0.1:1"), Conn(slots, "10.0.0.1:2"), Conn(slots, "10.0.0.1:3")
    busy.slot.hold()  # an HTTP request in progress
    device.slot.established = lambda: True  # an authenticated MQTT session
    newcomer = Conn(slots, "10.0.0.2:1")
    assert oldest.closed and not busy.closed and not device.closed and not newcomer.closed
    assert len(slots) == 3
    later = Conn(slots, "10.0.0.2:2")  # the newcomer is the only idle one left
    assert newcomer.closed and not later.closed
    assert slots.open("https", "10.0.0.3:1") is not None  # `later` shed in turn
    assert later.closed
    busy.slot.unhold()  # its request is done: idle, so it may be shed now
    assert slots.open("https", "10.0.0.3:2") is not None and busy.closed and not device.closed
    reasons = {r.reason: r.count for r in slots.take_report()}
    assert reasons[EVICTED] >= 3


def test_nothing_to_shed_refuses_the_new_socket() -> None:
    slots = ConnectionSlots(capacity=2, per_peer=100)
    a, b = Conn(slots, "10.0.0.1:1"), Conn(slots, "10.0.0.1:2")
    a.slot.hold()
    b.slot.established = lambda: True
    assert slots.open("https", "10.0.0.9:1") is None
    assert not a.closed and not b.closed
    assert [r.reason for r in slots.take_report()] == [CAPACITY]
    a.slot.release()
    assert slots.open("https", "10.0.0.9:2") is not None


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        ConnectionSlots(capacity=0, per_peer=1)
    slots = ConnectionSlots(capacity=5, per_peer=1)
    slots.capacity = 0
    assert slots.capacity == 1
