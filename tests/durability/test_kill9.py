"""A PUBACK means durable, even across `kill -9` of the whole `tether run` process.

20 devices (created through the registry before the hub starts) flood QoS 1 telemetry over plain
MQTT; the hub is killed with SIGKILL mid-run, restarted on the same data dir (and must serve again),
stopped, and its stream read back: zero acknowledged messages may be missing, each device's
messages stay in order, and duplicates are counted (the clients never resend, so 0 is expected).
The long version (several cycles, minutes of load) is `python -m bench.run --durability`.
"""

from __future__ import annotations

import os
from pathlib import Path

from rig import run_kill9

LOAD_S = float(os.environ.get("TETHER_KILL9_LOAD_S", "8"))


def test_no_acknowledged_message_is_lost_after_kill_9(tmp_path: Path) -> None:
    outcome = run_kill9(tmp_path / "hub", devices=20, load_s=LOAD_S, cycles=1)
    print(outcome.summary())
    assert outcome.acked_total > 1000, "the load did not get going"
    assert outcome.lost_total == 0, {d: sorted(x)[:10] for d, x in outcome.lost.items() if x}
    assert outcome.out_of_order == []
    assert outcome.duplicates == 0
    assert outcome.served_after_restart
