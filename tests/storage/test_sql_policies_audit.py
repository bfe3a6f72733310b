"""Policy and audit repositories on real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tether.storage.base import AuditRecord, PolicyRecord
from tether.storage.sql import SqlStorage


async def test_policy_upsert_get_list_delete(storage: SqlStorage) -> None:
    a = PolicyRecord("alpha", "k1", "k2", frozenset({"RegistryRead"}))
    await storage.policies.upsert(a)
    assert await storage.policies.get("alpha") == a
    b = PolicyRecord("alpha", "k3", "k2", frozenset({"RegistryRead", "RegistryReadWrite"}))
    await storage.policies.upsert(b)
    await storage.policies.upsert(PolicyRecord("Beta", "x", "y", frozenset({"ServiceConnect"})))
    assert await storage.policies.get("alpha") == b
    assert [p.name for p in await storage.policies.list()] == ["Beta", "alpha"]
    assert await storage.policies.get("ALPHA") is None
    assert await storage.policies.delete("alpha") is True
    assert await storage.policies.delete("alpha") is False
    assert await storage.policies.get("alpha") is None


def rec(action: str, outcome: str, at: datetime, **kw: object) -> AuditRecord:
    return AuditRecord(time=at, action=action, outcome=outcome, **kw)  # type: ignore[arg-type]


async def test_audit_append_and_query_filters(storage: SqlStorage) -> None:
    t0 = datetime(2030, 5, 1, tzinfo=UTC)
    await storage.audit.append(
        [
            rec("auth.mqtt", "refused", t0, principal="device:a", reason="bad-signature", peer="1.2.3.4:5"),
            rec("auth.rest", "allowed", t0 + timedelta(seconds=1), principal="policy:iothubowner"),
            rec("device.create", "ok", t0 + timedelta(seconds=2), principal="policy:iothubowner",
                target="a", details={"n": 1, "nested": {"x": [1, 2]}}),
            rec("authx", "ok", t0 + timedelta(seconds=3)),
        ]
    )
    newest_first = await storage.audit.query()
    assert [r.action for r in newest_first] == ["authx", "device.create", "auth.rest", "auth.mqtt"]
    assert all(r.id is not None for r in newest_first)
    created = newest_first[1]
    assert created.details == {"n": 1, "nested": {"x": [1, 2]}} and created.target == "a"
    assert created.time == t0 + timedelta(seconds=2)

    assert [r.action for r in await storage.audit.query(action_prefix="auth.")] == ["auth.rest", "auth.mqtt"]
    refused = await storage.audit.query(outcome="refused")
    assert len(refused) == 1 and refused[0].reason == "bad-signature" and refused[0].peer == "1.2.3.4:5"
    owner = await storage.audit.query(principal="policy:iothubowner")
    assert [r.action for r in owner] == ["device.create", "auth.rest"]
    since = await storage.audit.query(since=t0 + timedelta(seconds=2))
    assert [r.action for r in since] == ["authx", "device.create"]
    assert len(await storage.audit.query(limit=2)) == 2


async def test_audit_action_prefix_is_literal(storage: SqlStorage) -> None:
    t0 = datetime(2030, 5, 1, tzinfo=UTC)
    await storage.audit.append([rec("a_b.x", "ok", t0), rec("axb.y", "ok", t0), rec("a%c", "ok", t0)])
    assert [r.action for r in await storage.audit.query(action_prefix="a_b")] == ["a_b.x"]
    assert [r.action for r in await storage.audit.query(action_prefix="a%")] == ["a%c"]


async def test_audit_stores_long_free_text(storage: SqlStorage) -> None:
    long = "x" * 5000
    await storage.audit.append([rec("auth.mqtt", "refused", datetime.now(UTC), principal=long)])
    (found,) = await storage.audit.query()
    assert found.principal == long
