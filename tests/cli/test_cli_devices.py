"""`tether device …`, `token`, `policy`, `import`/`export` and `audit` in local mode."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from tether.security.connstr import DeviceConnectionString, ServiceConnectionString
from tether.security.sas import parse_token, scope_covers, verify_signature

from .conftest import Cli, json_lines

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()


def _keys(cli: Cli, device_id: str) -> tuple[str, str]:
    doc = json.loads(cli("device", "show", device_id, "--show-keys").stdout)
    sym = doc["authentication"]["symmetricKey"]
    return sym["primaryKey"], sym["secondaryKey"]


def test_device_create_hides_keys_unless_asked(cli: Cli, owner_cs: str) -> None:
    created = json.loads(cli("device", "create", "dev1").stdout)
    assert created["deviceId"] == "dev1"
    assert created["status"] == "enabled"
    assert created["authentication"]["type"] == "sas"
    assert created["authentication"]["symmetricKey"]["primaryKey"] == "<hidden>"

    shown = cli("device", "show", "dev1").stdout
    primary, secondary = _keys(cli, "dev1")
    assert len(base64.b64decode(primary)) == 32 and len(base64.b64decode(secondary)) == 32
    assert primary not in shown and secondary not in shown
    assert json.loads(shown)["etag"]


def test_device_create_with_given_keys_and_disabled(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "dev2", "--primary-key", KEY_A, "--secondary-key", KEY_B, "--disabled")
    assert _keys(cli, "dev2") == (KEY_A, KEY_B)
    assert json.loads(cli("device", "show", "dev2").stdout)["status"] == "disabled"


def test_device_create_self_signed(cli: Cli, owner_cs: str) -> None:
    thumb = "AB" * 20
    result = cli("device", "create", "x1", "--auth", "selfSigned", "--primary-thumbprint", thumb)
    doc = json.loads(result.stdout)
    assert doc["authentication"]["type"] == "selfSigned"
    assert doc["authentication"]["x509Thumbprint"]["primaryThumbprint"].upper() == thumb
    cs = cli("device", "connection-string", "x1").stdout.strip()
    assert cs == "HostName=localhost;DeviceId=x1;x509=true"
    bad = cli("device", "create", "x2", "--auth", "selfSigned", ok=False)
    assert bad.exit_code == 1 and "primary-thumbprint" in bad.stderr


def test_device_list_disable_enable_delete(cli: Cli, owner_cs: str) -> None:
    for name in ("a1", "a2", "a3"):
        cli("device", "create", name)
    listing = cli("device", "list").stdout
    assert all(name in listing for name in ("a1", "a2", "a3"))
    assert "DEVICE ID" in listing
    assert len(cli("device", "list", "--top", "2", "--json").stdout.splitlines()) == 2

    assert "disabled" in cli("device", "disable", "a2", "--reason", "stolen").stdout
    doc = json.loads(cli("device", "show", "a2").stdout)
    assert doc["status"] == "disabled" and doc["statusReason"] == "stolen"
    assert "enabled" in cli("device", "enable", "a2").stdout
    assert json.loads(cli("device", "show", "a2").stdout)["status"] == "enabled"

    cli("device", "delete", "a2")
    missing = cli("device", "show", "a2", ok=False)
    assert missing.exit_code == 1
    assert "a2" in missing.stderr and missing.stdout == ""


def test_device_update_and_etag(cli: Cli, owner_cs: str) -> None:
    etag = json.loads(cli("device", "create", "u1").stdout)["etag"]
    updated = json.loads(cli("device", "update", "u1", "--status", "disabled", "--etag", etag).stdout)
    assert updated["status"] == "disabled" and updated["etag"] != etag
    stale = cli("device", "update", "u1", "--status", "enabled", "--etag", etag, ok=False)
    assert stale.exit_code == 1
    stale_delete = cli("device", "delete", "u1", "--etag", etag, ok=False)
    assert stale_delete.exit_code == 1
    body = json.loads(cli("device", "show", "u1").stdout)
    body["status"] = "enabled"
    body["authentication"]["symmetricKey"] = {"primaryKey": KEY_A, "secondaryKey": KEY_B}
    replaced = json.loads(cli("device", "update", "u1", "--json", "-", input=json.dumps(body)).stdout)
    assert replaced["status"] == "enabled"
    assert _keys(cli, "u1") == (KEY_A, KEY_B)
    nothing = cli("device", "update", "u1", ok=False)
    assert nothing.exit_code == 1 and "nothing to update" in nothing.stderr


def test_device_regenerate_key(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "r1")
    primary, secondary = _keys(cli, "r1")
    out = cli("device", "regenerate-key", "r1", "--key", "primary").stdout
    assert primary not in out
    new_primary, new_secondary = _keys(cli, "r1")
    assert new_primary != primary and new_secondary == secondary


def test_device_connection_string(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "c1", "--primary-key", KEY_A, "--secondary-key", KEY_B)
    out = cli("device", "connection-string", "c1").stdout.strip()
    assert out == f"HostName=localhost;DeviceId=c1;SharedAccessKey={KEY_A}"
    cs = DeviceConnectionString.parse(out)
    assert cs.shared_access_key == KEY_A
    missing = cli("device", "connection-string", "c1", "--module", "m1", ok=False)
    assert missing.exit_code == 1 and "module m1 of device c1 not found" in missing.stderr
    cli("module", "create", "c1", "m1", "--primary-key", KEY_B, "--secondary-key", KEY_A)
    module = cli("device", "connection-string", "c1", "--module", "m1").stdout.strip()
    assert module == f"HostName=localhost;DeviceId=c1;ModuleId=m1;SharedAccessKey={KEY_B}"  # its own key
    x509 = cli("device", "connection-string", "c1", "--x509").stdout.strip()
    assert x509 == "HostName=localhost;DeviceId=c1;x509=true"


def test_token_device_verifies_with_the_device_key(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "t1", "--primary-key", KEY_A, "--secondary-key", KEY_B)
    before = int(time.time())
    token = cli("token", "device", "t1", "--ttl", "600").stdout.strip()
    parsed = parse_token(token)
    assert parsed.resource == "localhost/devices/t1"
    assert parsed.policy_name is None
    assert before + 600 <= parsed.expiry <= int(time.time()) + 600
    assert verify_signature(parsed, [KEY_A])
    assert not verify_signature(parsed, [KEY_B])


def test_token_device_with_a_device_connect_policy(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "t2")
    token = parse_token(cli("token", "device", "t2", "--policy", "device").stdout.strip())
    assert token.policy_name == "device"
    assert scope_covers(token.resource, "localhost/devices/t2")
    keys = json.loads(cli("policy", "list", "--show-keys", "--json").stdout)
    device_policy = next(p for p in keys if p["keyName"] == "device")
    assert verify_signature(token, [device_policy["primaryKey"]])
    refused = cli("token", "device", "t2", "--policy", "registryRead", ok=False)
    assert refused.exit_code == 1 and "DeviceConnect" in refused.stderr


def test_token_policy_is_a_hub_level_token(cli: Cli, owner_cs: str) -> None:
    token = parse_token(cli("token", "policy", "iothubowner").stdout.strip())
    assert token.resource == "localhost" and token.policy_name == "iothubowner"
    assert verify_signature(token, [ServiceConnectionString.parse(owner_cs).shared_access_key])


def test_policy_create_list_delete(cli: Cli, owner_cs: str) -> None:
    listing = cli("policy", "list").stdout
    for name in ("iothubowner", "service", "device", "registryRead", "registryReadWrite"):
        assert name in listing
    owner_key = ServiceConnectionString.parse(owner_cs).shared_access_key
    assert owner_key not in listing
    assert owner_key in cli("policy", "list", "--show-keys").stdout

    created = json.loads(cli("policy", "create", "ops", "--rights", "RegistryRead,ServiceConnect").stdout)
    assert created["keyName"] == "ops" and created["primaryKey"] == "<hidden>"
    assert created["rights"] == "RegistryRead, ServiceConnect"
    assert "ops" in cli("policy", "list").stdout
    cs = ServiceConnectionString.parse(cli("policy", "connection-string", "ops").stdout.strip())
    assert cs.shared_access_key_name == "ops"

    old = cs.shared_access_key
    cli("policy", "regenerate-key", "ops", "--key", "both")
    assert ServiceConnectionString.parse(cli("policy", "connection-string", "ops").stdout.strip()) \
        .shared_access_key != old

    bad = cli("policy", "create", "bad", "--rights", "Everything", ok=False)
    assert bad.exit_code == 1 and "Everything" in bad.stderr
    dup = cli("policy", "create", "ops", "--rights", "RegistryRead", ok=False)
    assert dup.exit_code == 1

    cli("policy", "delete", "ops")
    assert "ops" not in cli("policy", "list").stdout.split()
    assert cli("policy", "delete", "ops", ok=False).exit_code == 1


def test_import_export_round_trip(cli: Cli, owner_cs: str, tmp_path: Path) -> None:
    for name in ("e1", "e2", "e3"):
        cli("device", "create", name)
    keys = {name: _keys(cli, name) for name in ("e1", "e2", "e3")}
    export_file = tmp_path / "devices.jsonl"
    assert "exported 3 devices" in cli("export", str(export_file)).stdout
    assert export_file.stat().st_mode & 0o077 == 0
    stdout_lines = cli("export").stdout.splitlines()
    assert len(stdout_lines) == 3

    other = Cli(tmp_path / "other")
    other("init")
    assert other("import", str(export_file)).stdout.strip() == "imported 3 devices"
    assert {name: _keys(other, name) for name in keys} == keys
    exported_again = {json.loads(line)["deviceId"] for line in other("export").stdout.splitlines()}
    assert exported_again == set(keys)

    # all or nothing: a duplicate line refuses the whole file
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"deviceId": "n1"}) + "\n" + json.dumps({"deviceId": "e1"}) + "\n")
    refused = other("import", str(partial), ok=False)
    assert refused.exit_code == 1
    assert other("device", "show", "n1", ok=False).exit_code == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"deviceId": "z1"}\n{not json\n')
    result = other("import", str(broken), ok=False)
    assert result.exit_code == 1 and "line 2" in result.stderr


def test_audit_lists_the_changes(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "au1")
    cli("device", "disable", "au1")
    cli("policy", "create", "auditors", "--rights", "RegistryRead")
    lines = [json.loads(line) for line in cli("audit", "--json").stdout.splitlines()]
    actions = {(r["action"], r["target"]) for r in lines}
    assert any(a.startswith("device.") and t == "au1" for a, t in actions)
    assert ("policy.create", "auditors") in actions
    assert all(r["principal"] in ("cli:local", "system") for r in lines)
    assert any(r["principal"] == "cli:local" for r in lines)

    devices_only = json_lines(cli("audit", "--json", "--action", "device.").stdout)
    assert devices_only and all(r["action"].startswith("device.") for r in devices_only)
    table = cli("audit", "--limit", "2").stdout.splitlines()
    assert table[0].startswith("TIME") and len(table) == 4
    assert cli("audit", "--json", "--since", "2999-01-01T00:00:00Z").stdout == ""
    assert cli("audit", "--since", "yesterday", ok=False).exit_code == 1
    for line in cli("audit", "--json", "--outcome", "ok", "--principal", "cli:local").stdout.splitlines():
        record = json.loads(line)
        assert record["outcome"] == "ok" and record["principal"] == "cli:local"
    # no secret ever reaches the audit log
    assert ServiceConnectionString.parse(owner_cs).shared_access_key not in cli("audit", "--json").stdout
