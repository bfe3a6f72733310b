"""Settings load from TOML and environment, invalid values name the setting, docs stay complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tether.config import ConfigError, Settings, load_settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_are_secure() -> None:
    s = load_settings()
    assert s.tls.min_version == "TLSv1.2"
    assert s.listeners.mqtt_plain_port is None
    assert "ECDHE" in s.tls.ciphers and "RSA-AES" not in s.tls.ciphers.replace("ECDHE-RSA-AES", "")


def test_toml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "tether.toml"
    cfg.write_text('[hub]\nhostname = "from-file"\n[listeners]\nmqtt_port = 9999\n')
    monkeypatch.setenv("TETHER_CONFIG", str(cfg))
    monkeypatch.setenv("TETHER_LISTENERS__MQTT_PORT", "8884")
    s = load_settings()
    assert s.hub.hostname == "from-file"
    assert s.listeners.mqtt_port == 8884  # environment beats the file


@pytest.mark.parametrize(
    ("var", "value", "name"),
    [
        ("TETHER_LIMITS__MAX_CONNECTIONS", "0", "limits.max_connections"),
        ("TETHER_TLS__MIN_VERSION", "SSLv3", "tls.min_version"),
        ("TETHER_HUB__HOSTNAME", "bad host/name", "hub.hostname"),
        ("TETHER_LISTENERS__MQTT_PORT", "70000", "listeners.mqtt_port"),
    ],
)
def test_invalid_setting_names_it(monkeypatch: pytest.MonkeyPatch, var: str, value: str, name: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=re.escape(f"invalid setting {name}")):
        load_settings()


def test_unknown_toml_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "tether.toml"
    cfg.write_text("[hub]\nhostnam = 'typo'\n")
    monkeypatch.setenv("TETHER_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match=r"hub\.hostnam"):
        load_settings()


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    for section, field in Settings.model_fields.items():
        assert f"`[{section}]`" in text, section
        model = field.annotation
        assert model is not None
        for key in model.model_fields:  # type: ignore[union-attr]
            assert f"`{key}`" in text, f"{section}.{key} missing from docs/configuration.md"
