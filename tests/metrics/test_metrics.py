"""`GET /metrics` scraped from a real hub app (build_app on 127.0.0.1:0) after real requests.

The Prometheus registry is process-wide, so every assertion compares a scrape before and after.
Values are read with prometheus_client's own text parser, so the exposition format is checked too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hub_app_helpers import API, HOST, make_hub, new_key, serving
from prometheus_client.parser import text_string_to_metric_families

from tether.hub import Hub
from tether.security.sas import build_token

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = make_hub(tmp_path)
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(hub) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


async def scrape(client: httpx.AsyncClient) -> tuple[str, Samples]:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return r.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_bad_rest_token_is_counted_with_surface_and_reason(hub: Hub,
                                                                 client: httpx.AsyncClient) -> None:
    _, before = await scrape(client)
    policy = await hub.policies.get("registryReadWrite")
    forged = build_token(HOST, new_key(), int(time.time()) + 3600, policy.name)  # right name, wrong key
    r = await client.get(f"/devices{API}", headers={"Authorization": forged})
    assert r.status_code == 401
    r = await client.get(f"/devices{API}")  # no header at all
    assert r.status_code == 401
    good = build_token(HOST, policy.primary_key, int(time.time()) + 3600, policy.name)
    assert (await client.get(f"/devices{API}", headers={"Authorization": good})).status_code == 200

    text, after = await scrape(client)
    labels = {"surface": "rest", "reason": "invalid-credential"}  # a bad signature, publicly
    delta = value(after, "tether_auth_failures_total", **labels) - value(before, "tether_auth_failures_total",
                                                                          **labels)
    assert delta == 1
    missing = {"surface": "rest", "reason": "missing-credentials"}
    assert (value(after, "tether_auth_failures_total", **missing)
            - value(before, "tether_auth_failures_total", **missing)) == 1
    # the exposition line itself, as Prometheus reads it
    expected = value(after, "tether_auth_failures_total", **labels)
    assert f'tether_auth_failures_total{{reason="invalid-credential",surface="rest"}} {expected}' in text
    # the accepted request counted nowhere
    total = sum(v for (name, _), v in after.items() if name == "tether_auth_failures_total")
    total_before = sum(v for (name, _), v in before.items() if name == "tether_auth_failures_total")
    assert total - total_before == 2


async def test_device_https_refusal_is_counted_on_the_https_surface(hub: Hub,
                                                                    client: httpx.AsyncClient) -> None:
    await hub.registry.create("meter", {"authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": new_key(), "secondaryKey": new_key()}}}, actor="test")
    _, before = await scrape(client)
    forged = build_token(f"{HOST}/devices/meter", new_key(), int(time.time()) + 3600)
    r = await client.post(f"/devices/meter/messages/events{API}", content=b"x",
                          headers={"Authorization": forged})
    assert r.status_code == 401
    _, after = await scrape(client)
    labels = {"surface": "https", "reason": "invalid-credential"}
    assert value(after, "tether_auth_failures_total", **labels) - value(
        before, "tether_auth_failures_total", **labels) == 1
    assert value(after, "tether_auth_failures_total", surface="rest", reason="invalid-credential") == value(
        before, "tether_auth_failures_total", surface="rest", reason="invalid-credential")


IDENTITY_REVEALING = ("unknown-device", "unknown-policy", "unknown-module", "bad-signature",
                      "device-disabled", "wrong-auth-type", "thumbprint-mismatch")


async def test_metrics_cannot_tell_an_unknown_identity_from_a_bad_signature(hub: Hub,
                                                                          client: httpx.AsyncClient) -> None:
    """The responses to an unknown device / policy and to a bad signature are identical; the public
    `/metrics` must not tell them apart either (issue 14): both count as `invalid-credential`."""
    await hub.registry.create("meter", {"authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": new_key(), "secondaryKey": new_key()}}}, actor="test")
    later = int(time.time()) + 3600
    probes = {
        "rest": [build_token(HOST, new_key(), later, "registryRead"),  # exists, bad signature
                 build_token(HOST, new_key(), later, "noSuchPolicy")],  # does not exist
        "https": [build_token(f"{HOST}/devices/meter", new_key(), later),
                  build_token(f"{HOST}/devices/ghost", new_key(), later)],
    }
    for surface, (existing, unknown) in probes.items():
        counts = []
        for token in (existing, unknown):
            _, before = await scrape(client)
            if surface == "rest":
                r = await client.get(f"/devices{API}", headers={"Authorization": token})
            else:
                device = "meter" if token is existing else "ghost"
                r = await client.post(f"/devices/{device}/messages/events{API}", content=b"x",
                                      headers={"Authorization": token})
            assert r.status_code == 401
            _, after = await scrape(client)
            counts.append({dict(labels)["reason"]: v - before.get((name, labels), 0.0)
                           for (name, labels), v in after.items()
                           if name == "tether_auth_failures_total" and dict(labels)["surface"] == surface
                           and v != before.get((name, labels), 0.0)})
        assert counts[0] == counts[1] == {"invalid-credential": 1.0}, counts
    _, samples = await scrape(client)
    public = {dict(labels)["reason"] for name, labels in samples if name == "tether_auth_failures_total"}
    assert not public & set(IDENTITY_REVEALING), public


async def test_device_https_telemetry_counts_messages_and_bytes(hub: Hub,
                                                                client: httpx.AsyncClient) -> None:
    key = new_key()
    await hub.registry.create("meter", {"authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": key, "secondaryKey": new_key()}}}, actor="test")
    token = build_token(f"{HOST}/devices/meter", key, int(time.time()) + 3600)
    bodies = [b'{"t": 21.5}', b"", b"x" * 1000]
    _, before = await scrape(client)
    for body in bodies:
        r = await client.post(f"/devices/meter/messages/events{API}", content=body,
                              headers={"Authorization": token})
        assert r.status_code == 204, r.text
    r = await client.post(f"/devices/meter/messages/events{API}", content=b"y" * (256 * 1024 + 1),
                          headers={"Authorization": token})
    assert r.status_code == 413  # refused: counted in neither metric
    _, after = await scrape(client)

    def delta(name: str) -> float:
        return value(after, name, protocol="https") - value(before, name, protocol="https")

    assert delta("tether_d2c_messages_total") == len(bodies)
    assert delta("tether_d2c_bytes_total") == sum(len(b) for b in bodies)
