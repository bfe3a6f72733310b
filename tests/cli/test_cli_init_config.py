"""`tether init`, global options and settings errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tether.security.connstr import ServiceConnectionString

from .conftest import Cli


def test_init_prints_a_valid_owner_connection_string(cli: Cli) -> None:
    result = cli("init")
    cs = ServiceConnectionString.parse(result.stdout.strip())
    assert cs.host_name == "localhost"
    assert cs.shared_access_key_name == "iothubowner"
    assert (cli.data_dir / "tether.toml").is_file()
    assert (cli.data_dir / "pki" / "root-ca.pem").is_file()
    assert (cli.data_dir / "pki" / "server.pem").is_file()
    assert (cli.data_dir / "tether.db").is_file()
    assert cli.data_dir.stat().st_mode & 0o077 == 0  # holds keys: owner only


def test_init_if_needed_is_idempotent(cli: Cli) -> None:
    first = cli("init").stdout.strip()
    root = (cli.data_dir / "pki" / "root-ca.pem").read_bytes()
    again = cli("init", "--if-needed").stdout.strip()
    assert again == first
    assert (cli.data_dir / "pki" / "root-ca.pem").read_bytes() == root
    # a plain re-run repairs nothing that is fine and keeps the keys too
    assert cli("init").stdout.strip() == first


def test_init_hostname_is_saved_and_used_later(cli: Cli) -> None:
    cs = ServiceConnectionString.parse(cli("init", "--hostname", "hub.example.test").stdout.strip())
    assert cs.host_name == "hub.example.test"
    config = tomllib.loads((cli.data_dir / "tether.toml").read_text())
    assert config["hub"]["hostname"] == "hub.example.test"
    cli("device", "create", "d1")
    out = cli("device", "connection-string", "d1").stdout.strip()
    assert out.startswith("HostName=hub.example.test;DeviceId=d1;SharedAccessKey=")
    same = ServiceConnectionString.parse(cli("init", "--hostname", "hub.example.test").stdout.strip())
    assert same == cs
    other = cli("init", "--if-needed", "--hostname", "other.example.test", ok=False)
    assert other.exit_code == 1 and "tether.toml" in other.stderr


def test_config_option_points_at_a_settings_file(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text('[hub]\nhostname = "cfg.example.test"\n')
    cs = ServiceConnectionString.parse(cli("--config", str(config), "init").stdout.strip())
    assert cs.host_name == "cfg.example.test"


def test_invalid_setting_exits_2_naming_the_setting(cli: Cli) -> None:
    result = cli("device", "list", env={"TETHER_LIMITS__MAX_CONNECTIONS": "0"}, ok=False)
    assert result.exit_code == 2
    assert "limits.max_connections" in result.stderr


def test_missing_config_file_exits_2(cli: Cli, tmp_path: Path) -> None:
    result = cli("--config", str(tmp_path / "nope.toml"), "device", "list", ok=False)
    assert result.exit_code == 2
    assert "config" in result.stderr


def test_commands_before_init_say_how_to_start(cli: Cli) -> None:
    result = cli("device", "list", ok=False)
    assert result.exit_code == 2
    assert "hub.data_dir" in result.stderr and "tether init" in result.stderr


def test_help_works_for_every_command(cli: Cli) -> None:
    groups = {
        "": ["init", "run", "device", "policy", "token", "pki", "ca", "audit", "import", "export", "monitor"],
        "device": ["create", "show", "list", "update", "delete", "enable", "disable", "regenerate-key",
                   "connection-string"],
        "policy": ["list", "create", "delete", "regenerate-key", "connection-string"],
        "token": ["device", "policy"],
        "pki": ["init", "ca-cert", "device-cert", "proof-cert", "crl"],
        "ca": ["add", "list", "verify", "verification-code", "remove"],
    }
    for group, commands in groups.items():
        prefix = [group] if group else []
        top = cli(*prefix, "--help", data_dir=False).stdout
        for command in commands:
            assert command in top
            cli(*prefix, command, "--help", data_dir=False)
    # --help never needs valid settings
    cli("device", "list", "--help", env={"TETHER_LIMITS__MAX_CONNECTIONS": "0"})


def test_run_before_init_exits_2(cli: Cli) -> None:
    result = cli("run", ok=False)
    assert result.exit_code == 2 and "tether init" in result.stderr


def test_init_saves_the_settings_it_was_given(cli: Cli) -> None:
    """`make run` passes listener settings through the environment; `init` saves them, so a second shell
    (here: commands without the variables) uses the same hub address and ports."""
    env = {"TETHER_HUB__HOSTNAME": "127.0.0.85", "TETHER_LISTENERS__HOST": "127.0.0.85",
           "TETHER_LISTENERS__HTTPS_PORT": "9443", "TETHER_LIMITS__MAX_CONNECTIONS": "500"}
    first = cli("init", "--if-needed", env=env)
    assert first.stdout.startswith("HostName=127.0.0.85;")
    path = cli.data_dir / "tether.toml"
    assert path.stat().st_mode & 0o077 == 0  # may name a database URL with its password
    saved = tomllib.loads(path.read_text())
    assert saved["hub"] == {"hostname": "127.0.0.85"}
    assert saved["listeners"] == {"host": "127.0.0.85", "https_port": 9443}  # typed, not strings
    assert saved["limits"] == {"max_connections": 500}
    # a second shell: no variables, same settings
    assert cli("init", "--if-needed").stdout == first.stdout
    assert tomllib.loads(path.read_text()) == saved
    cli("device", "create", "d1")
    assert cli("device", "connection-string", "d1").stdout.startswith("HostName=127.0.0.85;")
    # a new value given later is saved too, and said so
    moved = cli("init", "--if-needed", env={"TETHER_LISTENERS__HTTPS_PORT": "443"})
    assert "saved listeners.https_port" in moved.stderr
    assert tomllib.loads(path.read_text())["listeners"] == {"host": "127.0.0.85", "https_port": 443}
    # the host name is baked into the certificate and every token: not changed behind the user's back
    renamed = cli("init", "--if-needed", env={"TETHER_HUB__HOSTNAME": "other.example"}, ok=False)
    assert renamed.exit_code == 1 and "tether.toml" in renamed.stderr
