"""`tether user …` and `tether role …` in local mode: operators created with hashed passwords read from
stdin (never arguments), TOTP enrolment printed once, roles assigned with validated scopes, disable."""

from __future__ import annotations

import json
from typing import Any

from loop_helpers import run_sync

from tether.config import load_settings
from tether.storage.sql import SqlStorage
from tether.storage.sql.operators import SqlOperatorRepository

PASSWORD = "correct horse battery staple"


def test_user_and_role_commands(cli: Any) -> None:
    cli("init")
    cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
    out = cli("user", "add", "bob", "--password-stdin", "--totp", input=PASSWORD + "\n").stdout
    assert out.startswith("otpauth://totp/Tether:bob?secret=")
    short = cli("user", "add", "carl", "--password-stdin", input="short\n", ok=False)
    assert short.exit_code == 1 and "12-1024" in short.stderr
    assigned = json.loads(cli("role", "assign", "--user", "alice", "--role", "iot hub data reader",
                              "--scope", "tags.site = 'a'").stdout)
    assert assigned["role"] == "DataReader" and assigned["scope"] == "tags.site = 'a'"
    bad = cli("role", "assign", "--user", "alice", "--role", "DataReader", "--scope", "tags.site = ",
              ok=False)
    assert bad.exit_code == 1 and "scope" in bad.stderr
    cli("role", "assign", "--subject", "0f3c-guid", "--issuer", "https://login.example/t/v2.0",
        "--role", "Owner")
    listed = json.loads(cli("role", "list", "--json").stdout)
    assert [(r["subject"], r["role"]) for r in listed] == [("alice", "DataReader"), ("0f3c-guid", "Owner")]
    cli("user", "disable", "alice")
    users = {u["username"]: u for u in json.loads(cli("user", "list", "--json").stdout)}
    assert users["alice"]["disabled"] is True and users["bob"]["totp"] is True
    cli("role", "remove", str(listed[1]["id"]))
    assert len(json.loads(cli("role", "list", "--json").stdout)) == 1
    audit = cli("audit", "--action", "operator.", "--json").stdout
    assert PASSWORD not in audit and "operator.disable" in audit


def test_password_never_comes_from_arguments(cli: Any) -> None:
    cli("init")
    r = cli("user", "add", "alice", PASSWORD, ok=False)
    assert r.exit_code != 0


def test_stored_hash_is_argon2id(cli: Any) -> None:
    cli("init")
    cli("user", "add", "dora", "--password-stdin", input=PASSWORD + "\n")

    async def stored() -> str:
        storage = SqlStorage(load_settings(hub={"data_dir": cli.data_dir}).database_url)
        await storage.start()
        try:
            record = await SqlOperatorRepository(storage.db).get_operator("dora")
            assert record is not None
            return record.password_hash
        finally:
            await storage.close()

    assert run_sync(stored).startswith("$argon2id$")
