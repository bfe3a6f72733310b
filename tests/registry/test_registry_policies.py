"""PolicyService: Azure's default policies, validation, key regeneration, auditing without keys."""

from __future__ import annotations

import base64

import pytest

from tether.errors import BadRequest, Conflict, NotFound
from tether.security.audit import AuditLog
from tether.security.policies import DEFAULT_POLICIES, PolicyService

ACTOR = "policy:iothubowner"
KEY = base64.b64encode(b"p" * 32).decode()


async def test_defaults_are_created_once_with_fresh_keys(policies: PolicyService) -> None:
    await policies.ensure_defaults()
    first = {p.name: p for p in await policies.list()}
    assert first.keys() == DEFAULT_POLICIES.keys()
    assert first["iothubowner"].permissions == {
        "RegistryRead", "RegistryReadWrite", "ServiceConnect", "DeviceConnect"}
    assert first["service"].permissions == {"ServiceConnect"}
    assert first["device"].permissions == {"DeviceConnect"}
    assert first["registryRead"].permissions == {"RegistryRead"}
    assert first["registryReadWrite"].permissions == {"RegistryRead", "RegistryReadWrite"}
    keys = [k for p in first.values() for k in (p.primary_key, p.secondary_key)]
    assert len(set(keys)) == 10 and all(len(base64.b64decode(k)) == 32 for k in keys)
    await policies.ensure_defaults()
    assert {p.name: p for p in await policies.list()} == first


async def test_defaults_not_recreated_after_operator_changes(policies: PolicyService) -> None:
    await policies.create("only", ["ServiceConnect"], actor=ACTOR)
    await policies.ensure_defaults()
    assert [p.name for p in await policies.list()] == ["only"]


async def test_create_get_delete(policies: PolicyService) -> None:
    created = await policies.create("ops.team-1", ["RegistryRead", "ServiceConnect"],
                                    primary_key=KEY, actor=ACTOR)
    assert created.primary_key == KEY and created.secondary_key != KEY
    assert await policies.get("ops.team-1") == created
    assert await policies.find("ops.team-1") == created
    with pytest.raises(Conflict):
        await policies.create("ops.team-1", ["RegistryRead"], actor=ACTOR)
    await policies.delete("ops.team-1", actor=ACTOR)
    with pytest.raises(NotFound) as info:
        await policies.get("ops.team-1")
    assert info.value.code == "KeyNameNotFound"
    with pytest.raises(NotFound):
        await policies.delete("ops.team-1", actor=ACTOR)
    assert await policies.find("bad name!") is None


@pytest.mark.parametrize(
    ("name", "rights", "primary", "field"),
    [
        ("", ["RegistryRead"], None, "name"),
        ("has space", ["RegistryRead"], None, "name"),
        ("x" * 65, ["RegistryRead"], None, "name"),
        ("ok", ["RegistryRead", "Everything"], None, "rights"),
        ("ok", [], None, "rights"),
        ("ok", ["RegistryRead"], "not base64!", "primaryKey"),
        ("ok", ["RegistryRead"], base64.b64encode(b"tiny").decode(), "primaryKey"),
        ("ok", ["RegistryRead"], base64.b64encode(b"x" * 65).decode(), "primaryKey"),
    ],
)
async def test_create_validation(
    policies: PolicyService, name: str, rights: list[str], primary: str | None, field: str
) -> None:
    with pytest.raises(BadRequest) as info:
        await policies.create(name, rights, primary_key=primary, actor=ACTOR)
    assert info.value.field == field
    assert await policies.find("ok") is None


async def test_regenerate_keys(policies: PolicyService) -> None:
    await policies.ensure_defaults()
    before = await policies.get("service")
    primary = await policies.regenerate_key("service", "primary", actor=ACTOR)
    assert primary.primary_key != before.primary_key and primary.secondary_key == before.secondary_key
    both = await policies.regenerate_key("service", "both", actor=ACTOR)
    assert both.primary_key != primary.primary_key and both.secondary_key != before.secondary_key
    assert both.permissions == before.permissions
    assert await policies.get("service") == both
    with pytest.raises(BadRequest) as info:
        await policies.regenerate_key("service", "third", actor=ACTOR)
    assert info.value.field == "which"
    with pytest.raises(NotFound):
        await policies.regenerate_key("nope", "primary", actor=ACTOR)


async def test_changes_are_audited_without_keys(policies: PolicyService, audit: AuditLog) -> None:
    created = await policies.create("audited", ["ServiceConnect"], primary_key=KEY, actor=ACTOR)
    regenerated = await policies.regenerate_key("audited", "both", actor=ACTOR)
    await policies.delete("audited", actor=ACTOR)
    records = await audit.query(action_prefix="policy.")
    assert [r.action for r in records] == ["policy.delete", "policy.regenerate-key", "policy.create"]
    assert all(r.target == "audited" and r.principal == ACTOR and r.outcome == "ok" for r in records)
    assert records[2].details == {"rights": ["ServiceConnect"]}
    text = repr(records)
    for secret in (created.primary_key, created.secondary_key, regenerated.primary_key):
        assert secret not in text
