"""Bearer tokens from an OpenID Connect provider on the REST API, against a real issuer (discovery and
JWKS over HTTP): every kind of bad token is refused with 401 and audited with its reason; good
tokens of each allowed algorithm work and the audit names the person and their issuer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import time

import pytest
from oidc_issuer import new_key
from operator_helpers import API, OperatorEnv

from tether.security.oidc import claim_at


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def handmade(header: dict[str, object], claims: dict[str, object], signature: bytes) -> str:
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)])


def claims_for(env: OperatorEnv, **extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"iss": env.issuer.issuer, "aud": "api://tether-test", "sub": "mallory", "iat": now, "nbf": now,
            "exp": now + 300, "roles": ["Tether.Owner"], **extra}


async def assert_refused(env: OperatorEnv, token: str, reason: str) -> None:
    r = await env.client.get(f"/devices{API}", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert token not in r.text
    record = await env.last_refusal()
    assert record.reason == reason, record
    assert record.credential == "oidc"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_each_allowed_algorithm_is_accepted_and_the_audit_names_the_person(env: OperatorEnv,
                                                                                 alg: str) -> None:
    key = next(k for k in env.issuer.keys if k.alg == alg)
    r = await env.client.get(f"/devices{API}", headers=bearer(env.issuer.mint("alice", key=key,
                                                                               roles=["Tether.Reader"])))
    assert r.status_code == 200, r.text
    allowed = (await env.audit("auth.rest", "allowed", limit=1))[0]
    assert allowed.principal == "user:alice"
    assert allowed.credential == "oidc"
    assert allowed.details["issuer"] == env.issuer.issuer


async def test_wrong_issuer_is_refused(env: OperatorEnv) -> None:
    await assert_refused(env, env.issuer.mint(roles=["Tether.Owner"], iss="https://evil.example/realm"),
                         "wrong-issuer")


async def test_wrong_audience_is_refused(env: OperatorEnv) -> None:
    await assert_refused(env, env.issuer.mint(roles=["Tether.Owner"], aud="api://other"), "wrong-audience")


async def test_expired_token_is_refused_beyond_the_skew(env: OperatorEnv) -> None:
    # within the 60 s skew: still good
    ok = env.issuer.mint(roles=["Tether.Owner"], exp=int(time.time()) - 20)
    assert (await env.client.get(f"/devices{API}", headers=bearer(ok))).status_code == 200
    await assert_refused(env, env.issuer.mint(roles=["Tether.Owner"], exp=int(time.time()) - 120), "expired")


async def test_not_yet_valid_token_is_refused(env: OperatorEnv) -> None:
    later = int(time.time()) + 600
    await assert_refused(env, env.issuer.mint(roles=["Tether.Owner"], nbf=later), "not-yet-valid")
    await assert_refused(env, env.issuer.mint(roles=["Tether.Owner"], iat=later), "not-yet-valid")


async def test_bad_signature_is_refused(env: OperatorEnv) -> None:
    impostor = new_key("RS256", kid="rsa-1")  # same kid, another key
    await assert_refused(env, env.issuer.mint(key=impostor, roles=["Tether.Owner"]), "bad-signature")
    good = env.issuer.mint(roles=["Tether.Owner"])
    head, body, sig = good.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    tampered["sub"] = "root"
    await assert_refused(env, f"{head}.{_b64(json.dumps(tampered).encode())}.{sig}", "bad-signature")


async def test_alg_none_is_refused(env: OperatorEnv) -> None:
    unsigned = handmade({"alg": "none", "kid": "rsa-1"}, claims_for(env), b"")
    await assert_refused(env, unsigned, "alg-not-allowed")
    await assert_refused(env, handmade({"alg": "None"}, claims_for(env), b""), "alg-not-allowed")


async def test_hs256_signed_with_the_public_key_is_refused(env: OperatorEnv) -> None:
    key = env.issuer.keys[0]
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims_for(env)).encode())}"
    for secret in (key.public_pem(), json.dumps(key.jwk()).encode()):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        await assert_refused(env, f"{signing_input}.{_b64(mac)}", "alg-not-allowed")


async def test_an_rs256_header_on_an_ec_key_is_refused(env: OperatorEnv) -> None:
    ec = next(k for k in env.issuer.keys if k.alg == "ES256")
    await assert_refused(env, env.issuer.mint(key=env.issuer.keys[0], kid=ec.kid, roles=["Tether.Owner"]),
                         "key-mismatch")


async def test_rotated_key_is_picked_up(make_env: object) -> None:
    async with make_env(provider={"jwks_min_refresh_s": 1}) as env:  # type: ignore[operator]
        owner = bearer(env.issuer.mint(roles=["Tether.Owner"]))
        assert (await env.client.get(f"/devices{API}", headers=owner)).status_code == 200
        fetched = env.issuer.jwks_hits
        rotated = new_key("ES256", kid="ec-2")
        env.issuer.keys = [rotated]  # the provider rotates: old keys gone, a new one published
        token = env.issuer.mint(key=rotated, roles=["Tether.Owner"])
        deadline = time.monotonic() + 30
        while True:  # within jwks_min_refresh_s of the last read the unknown kid is refused; then re-read
            r = await env.client.get(f"/devices{API}", headers=bearer(token))
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        assert r.status_code == 200, r.text
        assert env.issuer.jwks_hits > fetched
        old = env.issuer.mint(key=new_key("RS256", kid="rsa-1"), roles=["Tether.Owner"])
        await asyncio.sleep(1.1)
        await assert_refused(env, old, "unknown-key")  # the retired kid is gone after a re-read


async def test_unknown_kid_refetch_is_rate_limited(make_env: object) -> None:
    interval = 2.0
    async with make_env(provider={"jwks_min_refresh_s": interval}) as env:  # type: ignore[operator]
        owner = bearer(env.issuer.mint(roles=["Tether.Owner"]))
        assert (await env.client.get(f"/devices{API}", headers=owner)).status_code == 200
        assert env.issuer.jwks_hits == 1
        await asyncio.sleep(interval + 0.2)
        started = time.monotonic()
        for i in range(20):
            forged = env.issuer.mint(kid=f"forged-{i}", roles=["Tether.Owner"])
            await assert_refused(env, forged, "unknown-key")
        elapsed = time.monotonic() - started
        # one re-read for the first unknown kid, then at most one per interval
        assert 2 <= env.issuer.jwks_hits <= 1 + math.ceil(elapsed / interval), (env.issuer.jwks_hits, elapsed)
        refused = await env.audit("auth.rest", "refused", limit=100)
        assert sum(r.reason == "unknown-key" for r in refused) == 20


async def test_token_without_a_role_is_403_and_audited(env: OperatorEnv) -> None:
    r = await env.client.get(f"/devices{API}", headers=bearer(env.issuer.mint("nobody", roles=["Unrelated"])))
    assert r.status_code == 403
    assert (await env.last_refusal()).reason == "no-role"


async def test_local_assignment_grants_an_oidc_subject_a_role(env: OperatorEnv) -> None:
    token = env.issuer.mint("dave")
    assert (await env.client.get(f"/devices{API}", headers=bearer(token))).status_code == 403
    await env.hub.roles.assign(env.issuer.issuer, "dave", "IoT Hub Data Reader", actor="test")
    r = await env.client.get(f"/devices{API}", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert (await env.client.put(f"/devices/x{API}", json={}, headers=bearer(token))).status_code == 403


def test_claim_paths_reach_nested_claims() -> None:
    assert claim_at({"realm_access": {"roles": ["a"]}}, "realm_access.roles") == ["a"]
    assert claim_at({"roles": "x"}, "realm_access.roles") is None
