"""Authentication-failure throttling: bucket math, the LRU bound, peer keys, aggregated audit records,
and a credential-stuffing flood through the real Authenticator, storage and AuditLog on SQLite.

Clocks are injected (`Clock`), so nothing here sleeps."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tether.api.app import build_app
from tether.api.auth import AuthRateLimited, refusal_error
from tether.config import load_settings
from tether.hub import Hub
from tether.registry.models import Device
from tether.security.authenticator import Authenticator
from tether.security.principal import AuthRefused, Permission
from tether.security.sas import build_token
from tether.security.throttle import RATE_LIMITED, AuthThrottle, AuthThrottled, peer_key
from tether.storage.base import AuditRecord, PolicyRecord

HOST = "localhost"
ATTACKER = "203.0.113.7"
BYSTANDER = "198.51.100.9"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# --- the bucket ----------------------------------------------------------------------------------


def fail(throttle: AuthThrottle, peer: str, times: int = 1, action: str = "auth.mqtt") -> list[bool]:
    """`times` failed attempts; True for each one admitted (its token is kept, as for a refusal)."""
    return [throttle.admit(peer, action).allowed for _ in range(times)]


def test_burst_is_twice_the_rate_then_one_attempt_per_token() -> None:
    clock = Clock()
    throttle = AuthThrottle(5, clock=clock)
    assert throttle.burst == 10
    assert fail(throttle, "10.0.0.1:1000", 10) == [True] * 10
    refused = throttle.admit("10.0.0.1:1001", "auth.mqtt")
    assert not refused.allowed and refused.retry_after == pytest.approx(0.2)
    clock.advance(0.1)
    assert throttle.admit("10.0.0.1:1002", "auth.mqtt").retry_after == pytest.approx(0.1)
    clock.advance(0.1)  # 0.2 s at 5/s: exactly one token
    assert fail(throttle, "10.0.0.1:1003", 2) == [True, False]
    clock.advance(100)  # refills to the burst, never beyond
    assert throttle.tokens("10.0.0.1:9") == 10
    assert fail(throttle, "10.0.0.1:1004", 11) == [True] * 10 + [False]


def test_other_peers_have_their_own_buckets() -> None:
    throttle = AuthThrottle(1, clock=Clock())
    assert fail(throttle, "10.0.0.1:1", 3) == [True, True, False]
    assert fail(throttle, "10.0.0.2:1", 2) == [True, True]


def test_a_success_gives_its_token_back_and_a_full_bucket_is_forgotten() -> None:
    throttle = AuthThrottle(1, clock=Clock())
    first = throttle.admit("10.0.0.1:1", "auth.rest")
    assert first.allowed and len(throttle) == 1 and throttle.tokens("10.0.0.1:2") == 1
    throttle.refund(first.key)
    assert len(throttle) == 0 and throttle.tokens("10.0.0.1:2") == 2
    for _ in range(100):  # any number of successes in a row
        throttle.refund(throttle.admit("10.0.0.1:1", "auth.rest").key)
    assert throttle.tokens("10.0.0.1:1") == 2
    throttle.refund("never-seen")  # harmless


def test_attempts_in_flight_hold_a_token_so_concurrent_guesses_count() -> None:
    throttle = AuthThrottle(2, clock=Clock())  # burst 4
    in_flight = [throttle.admit(f"10.0.0.1:{port}", "auth.mqtt") for port in range(6)]
    assert [a.allowed for a in in_flight] == [True] * 4 + [False] * 2
    throttle.refund(in_flight[0].key)  # one of them succeeded
    assert throttle.admit("10.0.0.1:7", "auth.mqtt").allowed


def test_the_lru_of_peers_is_bounded_and_an_evicted_peer_starts_over() -> None:
    clock = Clock()
    throttle = AuthThrottle(1, clock=clock, max_peers=3)
    for n in range(1000):  # a spoofed-source flood: every address new
        fail(throttle, f"10.1.{n // 256}.{n % 256}:5", 1)
        assert len(throttle) <= 3
    assert len(throttle) == 3
    fail(throttle, "10.0.0.1:1", 4)  # throttled, 1 refusal recorded + 1 suppressed
    assert throttle.take_summaries() == []
    fail(throttle, "10.0.0.2:1", 1)
    fail(throttle, "10.0.0.3:1", 1)
    fail(throttle, "10.0.0.4:1", 1)  # evicts 10.0.0.1, the least recently seen
    summaries = throttle.take_summaries()
    assert [(s.peer, s.action, s.suppressed) for s in summaries] == [("10.0.0.1:1", "auth.mqtt", 1)]
    assert throttle.tokens("10.0.0.1:1") == 2  # forgotten: a full bucket again


def test_recently_seen_peers_stay_in_the_lru() -> None:
    throttle = AuthThrottle(1, clock=Clock(), max_peers=2)
    fail(throttle, "10.0.0.1:1", 3)
    fail(throttle, "10.0.0.2:1", 1)
    fail(throttle, "10.0.0.1:1", 1)  # touched: 10.0.0.2 is now the oldest
    fail(throttle, "10.0.0.3:1", 1)
    assert not throttle.admit("10.0.0.1:2", "auth.mqtt").allowed


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("192.0.2.1:8883", "192.0.2.1"),
        ("192.0.2.1", "192.0.2.1"),
        ("[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("[2001:DB8:1:2::9]:1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("[fe80::1%eth0]:1883", "fe80::/64"),
        ("[::ffff:192.0.2.1]:5000", "192.0.2.1"),
        ("[::1]:80", "::/64"),
        ("unix:/run/tether.sock", "unix:/run/tether.sock"),
        ("x" * 500, "x" * 64),
    ],
)
def test_peer_key(peer: str, key: str) -> None:
    assert peer_key(peer) == key


def test_ipv6_hosts_of_one_64_share_a_bucket_unless_asked_otherwise() -> None:
    throttle = AuthThrottle(1, clock=Clock())
    assert fail(throttle, "[2001:db8::1]:1", 2) == [True, True]
    assert fail(throttle, "[2001:db8::ffff:2]:9", 1) == [False]  # same /64
    assert fail(throttle, "[2001:db8:0:1::1]:1", 1) == [True]  # next /64
    per_address = AuthThrottle(1, clock=Clock(), ipv6_prefix=128)
    assert per_address.key("[2001:db8::1]:1") == "2001:db8::1"


def test_throttled_refusals_are_recorded_once_per_second_with_the_suppressed_count() -> None:
    clock = Clock()
    throttle = AuthThrottle(0.5, clock=clock, burst=1)
    assert throttle.admit("10.0.0.1:1", "auth.mqtt").allowed
    first = throttle.admit("10.0.0.1:2", "auth.mqtt")
    assert (first.allowed, first.record, first.suppressed) == (False, True, 0)
    assert first.verdict.details() == {"suppressed": 0}
    quiet = [throttle.admit("10.0.0.1:3", "auth.https") for _ in range(50)]
    assert not any(a.record or a.allowed for a in quiet)
    clock.advance(0.5)
    assert not throttle.admit("10.0.0.1:3", "auth.https").record
    clock.advance(0.5)  # a second after the first record; the bucket is not yet at one token
    due = throttle.admit("10.0.0.1:4", "auth.mqtt")
    assert (due.allowed, due.record, due.suppressed) == (False, True, 51)
    assert due.verdict.details() == {"suppressed": 51, "reasons": {RATE_LIMITED: 51}}
    throttle.admit("10.0.0.1:5", "auth.rest")
    throttle.admit("10.0.0.1:6", "auth.rest")
    clock.advance(1.0)  # one token at last: the attempt is verified, but the episode goes on
    admitted = throttle.admit("10.0.0.1:7", "auth.mqtt")
    assert admitted.allowed
    verdict = throttle.refused(admitted.key, "10.0.0.1:7", "auth.mqtt", "bad-signature")
    assert verdict.record and verdict.details() == {"suppressed": 2, "reasons": {RATE_LIMITED: 2}}
    again = throttle.admit("10.0.0.1:8", "auth.mqtt")
    assert (again.allowed, again.record) == (False, False)  # still one record per second at most
    assert throttle.take_summaries() == []


def test_throttled_bad_signature_retries_cost_about_one_record_per_second() -> None:
    """A client retrying a bad signature as fast as it can: the tokens that trickle back admit a
    verified attempt each, and those refusals are aggregated with the throttled ones (not an episode
    closed and reopened, ~3 records, per retry)."""
    clock = Clock()
    throttle = AuthThrottle(50, clock=clock)  # burst 100
    records = verified = 0
    for _ in range(10_000):  # 1,000 attempts per second for 10 s
        clock.advance(0.001)
        admission = throttle.admit("10.0.0.1:1", "auth.mqtt")
        if admission.allowed:
            verified += 1
            records += throttle.refused(admission.key, "10.0.0.1:1", "auth.mqtt", "bad-signature").record
        else:
            records += admission.record
    clock.advance(1.0)
    throttle.sweep()
    records += len(throttle.take_summaries())
    assert 100 + 400 <= verified <= 100 + 50 * 10 + 1  # the burst, then the rate
    # the burst's own records (plus the ~5 tokens refilled while it drains), then ~one per second
    assert records <= 100 + 5 + 10 + 3, records


def test_pre_authentication_refusals_are_charged_and_aggregated() -> None:
    clock = Clock()
    throttle = AuthThrottle(5, clock=clock)  # burst 10
    verdicts = [throttle.charge("10.0.0.2:1", "mqtt.connect", "client-id-mismatch") for _ in range(1000)]
    assert [v.record for v in verdicts[:11]] == [True] * 11  # the burst, then the episode's first
    assert verdicts[10].details() == {"suppressed": 0}
    assert not any(v.record for v in verdicts[11:])
    assert not throttle.admit("10.0.0.2:2", "auth.mqtt").allowed  # the peer is throttled now
    clock.advance(1.0)
    throttle.sweep()
    [summary] = throttle.take_summaries()
    assert summary.suppressed == 990 and summary.details()["reasons"] == {"client-id-mismatch": 989,
                                                                           RATE_LIMITED: 1}
    assert summary.reason == "client-id-mismatch"
    clock.advance(2.0)  # refilled: the episode is over and the peer forgotten
    throttle.sweep()
    assert len(throttle) == 0 and throttle.take_summaries() == []
    assert throttle.charge("10.0.0.2:3", "mqtt.connect", "bad-username").details() == {}


def test_a_flood_that_stops_is_summarised_by_the_sweep_without_another_attempt() -> None:
    clock = Clock()
    throttle = AuthThrottle(0.5, clock=clock, burst=1)
    throttle.admit("10.0.0.1:1", "auth.mqtt")
    throttle.admit("10.0.0.1:2", "auth.mqtt")  # recorded: the episode starts
    for port in range(3, 8):
        throttle.admit(f"10.0.0.1:{port}", "auth.mqtt")  # 5 suppressed
    clock.advance(0.5)
    throttle.sweep()
    assert throttle.take_summaries() == []  # not quiet for a second yet
    clock.advance(0.5)
    throttle.sweep()
    assert [(s.peer, s.suppressed) for s in throttle.take_summaries()] == [("10.0.0.1:7", 5)]
    throttle.sweep()
    assert throttle.take_summaries() == []  # written once
    clock.advance(0.1)
    late = throttle.admit("10.0.0.1:8", "auth.mqtt")  # still throttled: counted from zero again
    assert (late.allowed, late.record) == (False, False)
    clock.advance(1.0)
    throttle.sweep()
    assert [(s.peer, s.suppressed) for s in throttle.take_summaries()] == [("10.0.0.1:8", 1)]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        AuthThrottle(0)
    with pytest.raises(ValueError):
        AuthThrottle(1, max_peers=0)


def test_rest_maps_the_refusal_to_429_with_retry_after() -> None:
    error = refusal_error(AuthThrottled(2.2))
    assert isinstance(error, AuthRateLimited)
    assert (error.http_status, error.code) == (429, "ThrottlingException")
    assert error.headers == {"Retry-After": "3"}
    assert refusal_error(AuthRefused(RATE_LIMITED)).http_status == 429
    assert refusal_error(AuthRefused("bad-signature")).http_status == 401


# --- the Authenticator with counting fakes -------------------------------------------------------


KEY = new_key()
POLICY_KEY = new_key()
LATER = int(time.time()) + 3600


class Counting:
    """Device and policy lookups that count calls (the expensive part a throttled peer must not reach)."""

    def __init__(self) -> None:
        self.lookups = 0
        self.broken = False
        self.device = Device.model_validate(
            {"deviceId": "dev1", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY}}})

    async def find(self, name: str) -> Any:
        self.lookups += 1
        if self.broken:
            raise RuntimeError("database is down")
        if name == "dev1":
            return self.device
        if name == "iothubowner":
            return PolicyRecord("iothubowner", POLICY_KEY, POLICY_KEY, frozenset(p.value for p in Permission))
        return None


class ListAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def record(self, action: str, outcome: str, **fields: Any) -> None:
        self.records.append({"action": action, "outcome": outcome, **fields})


def good() -> str:
    return build_token(f"{HOST}/devices/dev1", KEY, LATER)


def bad() -> str:
    return build_token(f"{HOST}/devices/dev1", new_key(), LATER)


def authenticator(clock: Clock, rate: float | None = 1.0) -> tuple[Authenticator, Counting, ListAudit]:
    lookups, audit = Counting(), ListAudit()
    auth = Authenticator(hostname=HOST, devices=lookups, policies=lookups, audit=audit,
                         failure_rate=rate, throttle_clock=clock)
    return auth, lookups, audit


async def outcome(auth: Authenticator, token: str, peer: str | None) -> str:
    try:
        await auth.device_sas(token, "dev1", surface="mqtt", peer=peer)
    except AuthRefused as exc:
        return exc.reason
    return "allowed"


async def test_a_throttled_peer_is_refused_before_any_lookup_even_with_good_credentials() -> None:
    clock = Clock()
    auth, lookups, audit = authenticator(clock)
    assert [await outcome(auth, bad(), f"{ATTACKER}:{p}") for p in range(2)] == ["bad-signature"] * 2
    assert lookups.lookups == 2
    with pytest.raises(AuthThrottled) as caught:
        await auth.device_sas(good(), "dev1", surface="mqtt", peer=f"{ATTACKER}:9")
    assert caught.value.reason == RATE_LIMITED and caught.value.retry_after == pytest.approx(1.0)
    assert await outcome(auth, good(), f"{ATTACKER}:10") == RATE_LIMITED
    assert lookups.lookups == 2  # no lookup, no HMAC
    assert await outcome(auth, good(), f"{BYSTANDER}:1") == "allowed"
    assert await outcome(auth, good(), None) == "allowed"  # internal calls are never throttled
    clock.advance(1.0)
    assert await outcome(auth, good(), f"{ATTACKER}:11") == "allowed"
    reasons = [(r.get("peer"), r.get("reason"), r.get("details")) for r in audit.records]
    assert reasons == [
        (f"{ATTACKER}:0", "bad-signature", None),
        (f"{ATTACKER}:1", "bad-signature", None),
        (f"{ATTACKER}:9", RATE_LIMITED, {"suppressed": 0}),
        (f"{BYSTANDER}:1", None, None),
        (None, None, None),
        (f"{ATTACKER}:11", None, None),
    ]
    await auth.audit_throttled()  # the peer is quiet: the throttled refusal not written is summarised
    assert (audit.records[-1]["peer"], audit.records[-1]["reason"], audit.records[-1]["details"]) == (
        f"{ATTACKER}:10", RATE_LIMITED, {"suppressed": 1, "reasons": {RATE_LIMITED: 1}, "summary": True})
    assert audit.records[2]["principal"] == "device:dev1" and audit.records[-1].get("principal") is None


async def test_audit_throttled_writes_the_quiet_episodes() -> None:
    clock = Clock()
    auth, _, audit = authenticator(clock)
    for port in range(6):  # 2 verified, 1 recorded as throttled, 3 suppressed
        await outcome(auth, bad(), f"{ATTACKER}:{port}")
    await auth.audit_throttled()
    assert len(audit.records) == 3
    clock.advance(1.0)
    await auth.audit_throttled()
    assert audit.records[-1]["details"] == {"suppressed": 3, "reasons": {RATE_LIMITED: 3}, "summary": True}
    accounted = sum(1 for r in audit.records if not (r.get("details") or {}).get("summary"))
    assert accounted + audit.records[-1]["details"]["suppressed"] == 6


async def test_successes_never_drain_the_bucket() -> None:
    auth, _, _ = authenticator(Clock())
    for port in range(20):
        assert await outcome(auth, good(), f"{ATTACKER}:{port}") == "allowed"
    assert auth.throttle is not None and len(auth.throttle) == 0


async def test_internal_errors_are_not_charged_to_the_peer() -> None:
    auth, lookups, audit = authenticator(Clock())
    lookups.broken = True
    for _ in range(5):
        with pytest.raises(RuntimeError):
            await auth.device_sas(good(), "dev1", surface="mqtt", peer=f"{ATTACKER}:1")
    lookups.broken = False
    assert await outcome(auth, good(), f"{ATTACKER}:1") == "allowed"
    assert [r.get("reason") for r in audit.records] == ["internal-error"] * 5 + [None]


async def test_service_refusals_count_too_and_none_means_off() -> None:
    auth, _, _ = authenticator(Clock())
    wrong = build_token(HOST, new_key(), LATER, "iothubowner")
    for expected in ("bad-signature", "bad-signature", RATE_LIMITED):
        with pytest.raises(AuthRefused) as caught:
            await auth.service(wrong, required=Permission.registry_read, surface="rest", peer=f"{ATTACKER}:1")
        assert caught.value.reason == expected
    unlimited, _, _ = authenticator(Clock(), rate=None)
    assert unlimited.throttle is None
    assert {await outcome(unlimited, bad(), f"{ATTACKER}:1") for _ in range(50)} == {"bad-signature"}


# --- through the real services, storage and AuditLog on SQLite -----------------------------------


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = Hub(load_settings(hub={"hostname": HOST, "data_dir": tmp_path / "data"}))
    await h.open()
    try:
        yield h
    finally:
        await h.close()


def throttled_authenticator(hub: Hub, clock: Clock, rate: float) -> Authenticator:
    return Authenticator(hostname=HOST, devices=hub.registry, policies=hub.policies, audit=hub.audit,
                         failure_rate=rate, throttle_clock=clock)


async def sas_device(hub: Hub, device_id: str) -> str:
    """Creates the device; returns a valid token for it."""
    key = new_key()
    await hub.registry.create(device_id, {"authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": key, "secondaryKey": new_key()}}}, actor="test")
    return build_token(f"{HOST}/devices/{device_id}", key, LATER)


async def auth_records(hub: Hub, ip: str) -> list[AuditRecord]:
    records = await hub.audit.query(limit=10_000, action_prefix="auth.")
    return [r for r in records if r.peer is not None and peer_key(r.peer) == ip]


async def test_credential_stuffing_flood_through_the_real_audit_log(hub: Hub) -> None:
    clock = Clock()
    auth = throttled_authenticator(hub, clock, hub.settings.limits.auth_failures_per_second)  # 50/s
    victim_token = await sas_device(hub, "victim")
    other_token = await sas_device(hub, "other")
    wrong = build_token(f"{HOST}/devices/victim", new_key(), LATER)

    reasons = [await outcome_of(auth, wrong, "victim", f"{ATTACKER}:{40000 + n}") for n in range(500)]
    assert reasons.count("bad-signature") == 100  # the burst: only these were really verified
    assert reasons.count(RATE_LIMITED) == 400
    assert await outcome_of(auth, victim_token, "victim", f"{ATTACKER}:1") == RATE_LIMITED
    assert await outcome_of(auth, other_token, "other", f"{BYSTANDER}:5000") == "allowed"

    rows = await auth_records(hub, ATTACKER)
    assert len(rows) == 101  # 100 verified refusals + one aggregated record, not 501
    assert sum(r.reason == "bad-signature" for r in rows) == 100
    limited = [r for r in rows if r.reason == RATE_LIMITED]
    assert len(limited) == 1 and limited[0].details == {"suppressed": 0}

    clock.advance(0.5)  # 25 tokens back: guesses are verified (and refused) again, at the rate...
    assert await outcome_of(auth, wrong, "victim", f"{ATTACKER}:2") == "bad-signature"
    clock.advance(1.5)  # ...and the real device behind that address gets in
    assert await outcome_of(auth, victim_token, "victim", f"{ATTACKER}:3") == "allowed"
    await auth.audit_throttled()  # the hub's sweep: the quiet episode's counts in one record

    rows = await auth_records(hub, ATTACKER)
    individually = [r for r in rows if not r.details.get("summary")]
    suppressed: dict[str, int] = {}
    for r in rows:
        for reason, count in r.details.get("reasons", {}).items():
            suppressed[reason] = suppressed.get(reason, 0) + count
    refused = sum(r.reason == RATE_LIMITED for r in individually) + suppressed.get(RATE_LIMITED, 0)
    assert refused == 401  # every rate-limited refusal is accounted for
    assert suppressed.get("bad-signature") == 1  # the guess verified during the episode, aggregated
    assert [r.outcome for r in rows if r.reason is None] == ["allowed"]
    assert len(rows) < 110


async def outcome_of(auth: Authenticator, token: str, device_id: str, peer: str) -> str:
    try:
        await auth.device_sas(token, device_id, surface="mqtt", peer=peer)
    except AuthRefused as exc:
        return exc.reason
    return "allowed"


async def test_rest_answers_429_throttling_exception(hub: Hub) -> None:
    clock = Clock()
    hub.authenticator = throttled_authenticator(hub, clock, 1.0)  # burst 2
    runner = web.AppRunner(build_app(hub), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    owner = await hub.policies.get("iothubowner")
    token = build_token(HOST, owner.primary_key, LATER, "iothubowner")
    try:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            url = "/devices?api-version=2021-04-12"
            garbage = {"Authorization": "SharedAccessSignature x"}
            statuses = [(await client.get(url, headers=garbage)).status_code for _ in range(3)]
            assert statuses == [401, 401, 429]
            refused = await client.get(url, headers={"Authorization": token})
            assert refused.status_code == 429
            assert refused.json()["errorCode"] == "ThrottlingException"
            assert "retry in 1 s" in refused.json()["message"]
            clock.advance(1.0)
            assert (await client.get(url, headers={"Authorization": token})).status_code == 200
    finally:
        await runner.cleanup()
