"""`tether module …` locally and against a running hub, and module credentials from the CLI
(connection strings and tokens signed with the module's own key, accepted by the authenticator)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tether.config import load_settings
from tether.hub import Hub
from tether.security.connstr import DeviceConnectionString
from tether.security.principal import AuthRefused, PrincipalKind
from tether.security.sas import parse_token, verify_signature

from .conftest import Cli, json_lines
from .test_cli_remote import RunningHub

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
THUMB = "CD" * 20


def test_module_lifecycle_locally(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "dev")
    created = json.loads(cli("module", "create", "dev", "edge", "--managed-by", "IotEdge").stdout)
    assert (created["deviceId"], created["moduleId"], created["managedBy"]) == ("dev", "edge", "IotEdge")
    assert created["authentication"]["symmetricKey"]["primaryKey"] == "<hidden>"
    cli("module", "create", "dev", "cam", "--auth", "selfSigned", "--primary-thumbprint", THUMB)
    shown = json.loads(cli("module", "show", "dev", "edge", "--show-keys").stdout)
    primary = shown["authentication"]["symmetricKey"]["primaryKey"]
    assert len(base64.b64decode(primary)) == 32

    listing = cli("module", "list", "dev").stdout
    assert listing.index("cam") < listing.index("edge") and "IotEdge" in listing and "selfSigned" in listing
    listed = json_lines(cli("module", "list", "dev", "--json").stdout)
    assert [m["moduleId"] for m in listed] == ["cam", "edge"]
    assert primary not in cli("module", "list", "dev", "--json").stdout

    updated = json.loads(cli("module", "update", "dev", "edge", "--primary-key", KEY_A, "--show-keys").stdout)
    assert updated["authentication"]["symmetricKey"]["primaryKey"] == KEY_A
    assert updated["authentication"]["symmetricKey"]["secondaryKey"] == shown["authentication"][
        "symmetricKey"]["secondaryKey"]
    stale = cli("module", "update", "dev", "edge", "--managed-by", "x", "--etag", created["etag"], ok=False)
    assert stale.exit_code == 1 and "etag" in stale.stderr.lower()
    regenerated = json.loads(cli("module", "regenerate-key", "dev", "edge", "--key", "primary",
                                 "--show-keys").stdout)
    assert regenerated["authentication"]["symmetricKey"]["primaryKey"] != KEY_A

    x509 = cli("module", "connection-string", "dev", "cam").stdout.strip()
    assert x509 == "HostName=localhost;DeviceId=dev;ModuleId=cam;x509=true"
    cli("module", "delete", "dev", "cam")
    missing = cli("module", "show", "dev", "cam", ok=False)
    assert missing.exit_code == 1 and "module cam of device dev not found" in missing.stderr
    unknown_device = cli("module", "create", "ghost", "m", ok=False)
    assert unknown_device.exit_code == 1 and "ghost" in unknown_device.stderr
    audit = cli("audit", "--action", "module.").stdout
    assert "module.create" in audit and "module.delete" in audit and "dev/cam" in audit


def test_module_credentials_authenticate_as_the_module(cli: Cli, owner_cs: str) -> None:
    cli("device", "create", "dev", "--primary-key", KEY_B, "--secondary-key", KEY_A)
    cli("module", "create", "dev", "m", "--primary-key", KEY_A, "--secondary-key", KEY_B)
    cs = DeviceConnectionString.parse(cli("module", "connection-string", "dev", "m").stdout.strip())
    assert (cs.device_id, cs.module_id, cs.shared_access_key) == ("dev", "m", KEY_A)
    token = cli("module", "token", "dev", "m", "--ttl", "600").stdout.strip()
    assert token == token.strip() and parse_token(token).resource == "localhost/devices/dev/modules/m"
    assert verify_signature(parse_token(token), [KEY_A]) and not verify_signature(parse_token(token), [KEY_B])
    same = parse_token(cli("token", "device", "dev", "--module", "m").stdout.strip())
    assert same.resource == "localhost/devices/dev/modules/m" and verify_signature(same, [KEY_A])
    device_token = cli("token", "device", "dev").stdout.strip()
    policy_token = parse_token(cli("module", "token", "dev", "m", "--policy", "device").stdout.strip())
    assert policy_token.policy_name == "device"

    async def check() -> None:
        hub = Hub(load_settings(hub={"hostname": "localhost", "data_dir": cli.data_dir}))
        await hub.open()
        try:
            principal = await hub.authenticator.device_sas(token, "dev", "m", surface="mqtt")
            assert (principal.kind, principal.device_id, principal.module_id) == (
                PrincipalKind.module, "dev", "m")
            with pytest.raises(AuthRefused) as refused:
                await hub.authenticator.device_sas(device_token, "dev", "m", surface="mqtt")
            assert refused.value.reason == "wrong-scope"
        finally:
            await hub.close()

    asyncio.run(check())


def test_module_commands_against_a_running_hub(cli: Cli, owner_cs: str) -> None:
    with RunningHub(cli.data_dir) as running:
        opts = ("--hub-url", running.url, "--connection-string", owner_cs)
        cli(*opts, "device", "create", "rdev")
        created = json.loads(cli(*opts, "module", "create", "rdev", "rmod").stdout)
        assert created["moduleId"] == "rmod" and created["generationId"]
        assert "rmod" in cli(*opts, "module", "list", "rdev").stdout
        cs = cli(*opts, "module", "connection-string", "rdev", "rmod").stdout.strip()
        key = json.loads(cli(*opts, "module", "show", "rdev", "rmod", "--show-keys").stdout)[
            "authentication"]["symmetricKey"]["primaryKey"]
        assert cs == f"HostName=localhost;DeviceId=rdev;ModuleId=rmod;SharedAccessKey={key}"
        token = parse_token(cli(*opts, "module", "token", "rdev", "rmod").stdout.strip())
        assert verify_signature(token, [key])
        regenerated = json.loads(cli(*opts, "module", "regenerate-key", "rdev", "rmod", "--key", "both",
                                     "--show-keys").stdout)
        assert regenerated["authentication"]["symmetricKey"]["primaryKey"] != key
        cli(*opts, "module", "update", "rdev", "rmod", "--managed-by", "ops")
        assert json.loads(cli(*opts, "module", "show", "rdev", "rmod").stdout)["managedBy"] == "ops"
        cli(*opts, "module", "delete", "rdev", "rmod")
        assert cli(*opts, "module", "list", "rdev", "--json").stdout.strip() == ""
        gone = cli(*opts, "module", "show", "rdev", "rmod", ok=False)
        assert gone.exit_code == 1
