"""Local operators: argon2id passwords, lockout after repeated failures (audited), TOTP as a second
factor (RFC 6238 vectors, replay refused), and sessions that end when the operator is disabled."""

from __future__ import annotations

import time

import httpx
import pytest
from operator_helpers import API, PASSWORD, OperatorEnv

from tether.security import totp
from tether.security.operators import OperatorService
from tether.security.sessions import SessionService
from tether.storage.sql import SqlStorage
from tether.storage.sql.operators import SqlOperatorRepository

RFC6238_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # base32 of "12345678901234567890"


@pytest.mark.parametrize(("at", "code"), [(59, "94287082"), (1111111109, "07081804"),
                                          (1111111111, "14050471"), (1234567890, "89005924"),
                                          (2000000000, "69279037"), (20000000000, "65353130")])
def test_totp_matches_the_rfc_6238_sha1_vectors(at: int, code: str) -> None:
    assert totp.totp(RFC6238_SECRET, at, digits=8) == code


def test_totp_accepts_one_step_of_drift_and_nothing_else() -> None:
    secret = totp.generate_secret()
    now = 1_700_000_000
    assert totp.verify(secret, totp.totp(secret, now), at=now) == now // 30
    assert totp.verify(secret, totp.totp(secret, now - 30), at=now) == now // 30 - 1
    assert totp.verify(secret, totp.totp(secret, now - 90), at=now) is None
    assert totp.verify(secret, "12345", at=now) is None
    assert totp.provisioning_uri(secret, "alice").startswith("otpauth://totp/Tether:alice?secret=")


async def test_passwords_are_stored_as_argon2id_hashes(env: OperatorEnv) -> None:
    record, secret = await env.hub.operators.add("alice", PASSWORD, actor="test")
    assert secret is None
    assert record.password_hash.startswith("$argon2id$")
    assert PASSWORD not in record.password_hash
    created = (await env.audit("operator.", limit=1))[0]
    assert created.action == "operator.create" and PASSWORD not in str(created.details)


async def test_wrong_passwords_lock_the_operator_out_and_the_lockout_is_audited(env: OperatorEnv) -> None:
    await env.hub.operators.add("bob", PASSWORD, actor="test")
    await env.hub.roles.assign("local", "bob", "DataReader", actor="test")
    for _ in range(env.hub.settings.operators.lockout_threshold):
        r = await env.login("bob", "wrong password here")
        assert r.status_code == 401
        assert "wrong password here" not in r.text
    lockout = (await env.audit("operator.lockout", limit=1))[0]
    assert lockout.principal == "user:bob" and lockout.details["issuer"] == "local"
    r = await env.login("bob")  # even the right password is refused while locked out
    assert r.status_code == 401 and "locked-out" in r.text
    refused = await env.last_refusal("auth.console")
    assert refused.reason == "locked-out" and refused.principal == "user:bob"
    await env.hub.operators.set_password("bob", PASSWORD + "!", actor="test")  # a reset unlocks
    assert (await env.login("bob", PASSWORD + "!")).status_code == 200


async def test_unknown_operator_and_wrong_password_look_the_same(env: OperatorEnv) -> None:
    await env.hub.operators.add("erin", PASSWORD, actor="test")
    a = await env.login("erin", "not the password")
    b = await env.login("nosuchuser", "not the password")
    assert a.status_code == b.status_code == 401
    assert a.json()["message"] == b.json()["message"]


async def test_totp_is_required_checked_and_single_use(env: OperatorEnv) -> None:
    _, secret = await env.hub.operators.add("carol", PASSWORD, with_totp=True, actor="test")
    assert secret is not None
    await env.hub.roles.assign("local", "carol", "DataReader", actor="test")
    r = await env.login("carol")
    assert r.status_code == 401 and "totp-required" in r.text
    r = await env.login("carol", code="000000" if totp.totp(secret, time.time()) != "000000" else "111111")
    assert r.status_code == 401
    assert (await env.last_refusal("auth.console")).reason == "bad-totp"
    code = totp.totp(secret, time.time())
    r = await env.login("carol", code=code)
    if r.status_code == 401:  # the step turned over between code and check: the next one works
        r = await env.login("carol", code=totp.totp(secret, time.time()))
    assert r.status_code == 200, r.text
    replay = await env.login("carol", code=code)
    assert replay.status_code == 401  # the same code twice is refused


async def test_disabling_an_operator_ends_their_session_at_once(env: OperatorEnv) -> None:
    await env.hub.operators.add("dan", PASSWORD, actor="test")
    await env.hub.roles.assign("local", "dan", "DataContributor", actor="test")
    r = await env.login("dan")
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    async with env.session_client(r) as session:
        assert (await session.get(f"/devices{API}")).status_code == 200
        await env.hub.operators.set_disabled("dan", True, actor="test")
        after = await session.get(f"/devices{API}")
        assert after.status_code == 401
        assert (await env.last_refusal()).reason == "unknown-session"
    assert (await env.login("dan")).status_code == 403  # and cannot sign in again
    await env.hub.operators.set_disabled("dan", False, actor="test")
    assert (await env.login("dan")).status_code == 200


async def test_sign_out_ends_the_session_and_needs_the_csrf_token(env: OperatorEnv) -> None:
    await env.hub.operators.add("fay", PASSWORD, actor="test")
    await env.hub.roles.assign("local", "fay", "Owner", actor="test")
    r = await env.login("fay")
    async with env.session_client(r) as session:
        no_csrf = await session.post("/console/auth/logout", headers={"X-CSRF-Token": "nope"})
        assert no_csrf.status_code == 401
        put = await session.put(f"/devices/x{API}", json={}, headers={"X-CSRF-Token": ""})
        assert put.status_code == 403 and (await env.last_refusal()).reason == "csrf-mismatch"
        assert (await session.post("/console/auth/logout")).status_code == 200
        assert (await session.get(f"/devices{API}")).status_code == 401


async def test_sign_in_needs_a_json_body(env: OperatorEnv) -> None:
    r = await env.client.post("/console/auth/login", data={"username": "x", "password": "y"})
    assert r.status_code == 400


async def test_session_expiry_and_records_on_both_databases(db_url: str) -> None:
    storage = SqlStorage(db_url)
    await storage.start()
    try:
        repo = SqlOperatorRepository(storage.db)
        from datetime import UTC, datetime, timedelta

        clock = [datetime(2030, 1, 1, tzinfo=UTC)]
        sessions = SessionService(repo, ttl_s=600, now=lambda: clock[0])
        token, record = await sessions.create(issuer="local", subject="gil", display_name="Gil")
        assert record.token_hash != token and len(record.csrf_token) >= 40
        assert (await sessions.lookup(token)) is not None
        clock[0] += timedelta(seconds=601)
        assert (await sessions.lookup(token)) is None
        from tether.security.audit import AuditLog

        audit = AuditLog(storage.audit)
        operators = OperatorService(repo, audit, lockout_threshold=2, lockout_s=60)
        await operators.add("gil", PASSWORD, with_totp=True, actor="t")
        assert await repo.use_totp_step("gil", 10) and not await repo.use_totp_step("gil", 10)
        assert await repo.use_totp_step("gil", 11)
        assert [o.username for o in await operators.list()] == ["gil"]
        await audit.close()
    finally:
        await storage.close()


async def test_disabling_an_operator_ends_their_open_telemetry_feed(env: OperatorEnv) -> None:
    await env.hub.operators.add("hal", PASSWORD, actor="test")
    await env.hub.roles.assign("local", "hal", "DataReader", actor="test")
    r = await env.login("hal")
    async with env.session_client(r) as session, \
            session.stream("GET", f"/tether/events/stream{API}&heartbeat=1") as feed:
        assert feed.status_code == 200
        lines = feed.aiter_lines()
        assert await anext(lines) == ": connected"
        await env.hub.operators.set_disabled("hal", True, actor="test")
        started = time.monotonic()
        with pytest.raises(httpx.HTTPError):  # the hub closes the connection (heartbeats until then)
            async for _line in lines:
                assert time.monotonic() - started < 60
        assert time.monotonic() - started < 60
