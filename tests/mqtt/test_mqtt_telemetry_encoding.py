"""The telemetry pipeline's per-message shortcuts change nothing a consumer sees: the system
properties' JSON (built from cached per-identity fragments) is exactly the log's encoding of the
dict, the cached enqueued-time second formats like strftime, and messages are counted once durable."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from tether.config import LimitSettings
from tether.messaging import telemetry
from tether.messaging.telemetry import (
    SYSTEM_PROPERTY_NAMES,
    TelemetryPipeline,
    build_properties,
    enqueued_time,
)
from tether.observability.metrics import REGISTRY
from tether.security.principal import CredentialKind, Principal, PrincipalKind
from tether.storage.stream.local import LocalEventStream

LOG_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
AWKWARD = "é \" \\ \x00 \x7f \u2028 🙂"


def who(device: str = "dev1", module: str | None = None,
        credential: CredentialKind = CredentialKind.device_key) -> Principal:
    return Principal(PrincipalKind.module if module else PrincipalKind.device, credential, device, module)


@pytest.mark.parametrize("credential", list(CredentialKind))
@pytest.mark.parametrize("module", [None, "", "m-" + AWKWARD])
@pytest.mark.parametrize("model_id", [None, "", "dtmi:x;1"])
def test_encoded_system_properties_are_the_log_encoding(credential: CredentialKind, module: str | None,
                                                        model_id: str | None) -> None:
    bags = [{}, {"$.zz": "kept as app"}, {key: f"{key}={AWKWARD}" for key in SYSTEM_PROPERTY_NAMES}]
    for bag in bags:
        _, system = build_properties(who("d" + AWKWARD, module, credential), bag, {"a": "b"},
                                     now=1_700_000_000.5, model_id=model_id)
        assert system.encoded == LOG_JSON.encode(dict(system)).encode("utf-8")
        assert json.loads(system.encoded) == system
        assert list(system)[-2:] == ["iothub-enqueuedtime", "iothub-message-source"]


def test_identity_cache_keeps_identities_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "CONNECTION_CACHE", 3)  # fill and start over while checking
    for _ in range(3):
        for n in range(5):
            for credential in (CredentialKind.device_key, CredentialKind.x509_ca):
                for module in (None, "m"):
                    _, system = build_properties(who(f"d{n}", module, credential), {}, {}, now=0)
                    assert system["iothub-connection-device-id"] == f"d{n}"
                    assert system.get("iothub-connection-module-id") == module
                    assert system["iothub-connection-auth-method"] == telemetry.auth_method(
                        credential, module=module is not None)
                    assert system.encoded == LOG_JSON.encode(dict(system)).encode()


def test_enqueued_time_cache_formats_like_strftime() -> None:
    def reference(now: float) -> str:
        seconds = int(now)
        millis = int((now - seconds) * 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"

    rng = random.Random(7)
    moments = [1_700_000_000 + i / 997 for i in range(3000)] + [rng.uniform(0, 4e9) for _ in range(500)]
    for now in [*moments, *reversed(moments), 0.0, 0.9999, -0.25]:
        assert enqueued_time(now) == reference(now), now


def counted(protocol: str) -> tuple[float, float]:
    labels = {"protocol": protocol}
    return (REGISTRY.get_sample_value("tether_d2c_messages_total", labels) or 0.0,
            REGISTRY.get_sample_value("tether_d2c_bytes_total", labels) or 0.0)


async def test_durable_messages_are_counted_within_a_loop_turn(tmp_path: Path) -> None:
    stream = LocalEventStream(tmp_path, 2, 24.0, 1 << 30)
    await stream.start()
    pipeline = TelemetryPipeline(stream, LimitSettings())
    protocol = f"test-{time.monotonic_ns()}"
    try:
        event = await pipeline.append(who(), b"12345", {"$.mid": "1"}, {}, protocol=protocol)
        assert event.system_properties["message-id"] == "1"
        futures = [pipeline.append_nowait(who(f"d{i}"), b"xy", {}, {"i": str(i)}, protocol=protocol)
                   for i in range(4)]
        events = await asyncio.gather(*futures)
        assert [e.properties["i"] for e in events] == ["0", "1", "2", "3"]
        await asyncio.sleep(0)
        assert counted(protocol) == (5, 5 + 4 * 2)
        first = pipeline.append_nowait(who("g"), b"abc", {}, {}, protocol=protocol)
        joined = [pipeline.append_nowait(who("g"), b"abc", {}, {}, protocol=protocol, join=first)
                  for _ in range(2)]
        assert all(f is first for f in joined)
        await first
        await asyncio.sleep(0)
        assert counted(protocol) == (8, 13 + 3 * 3)  # a group counts each of its messages
    finally:
        await stream.close()
    refused = pipeline.append_nowait  # a closed stream refuses at once and counts nothing
    with pytest.raises(Exception, match="closed"):
        refused(who(), b"zz", {}, {}, protocol=protocol)
    await asyncio.sleep(0)
    assert counted(protocol) == (8, 22)
