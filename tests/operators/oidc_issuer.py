"""A real OpenID Connect issuer for tests, served by aiohttp on a loopback address: discovery, JWKS
(RSA, EC P-256 and Ed25519 keys; rotation), an authorization endpoint that signs in a chosen test
person at once (authorization code + PKCE, checked), and a token endpoint. `mint()` signs tokens with
any key, algorithm and claims, so tests can forge exactly the bad token they need."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

AUDIENCE = "api://tether-test"
CLIENT_ID = "tether-console"


@dataclass
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algo = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[self.alg]
        doc: dict[str, Any] = json.loads(algo.to_jwk(public))
        return {**doc, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def new_key(alg: str, kid: str | None = None) -> Key:
    private: Any
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return Key(kid or secrets.token_hex(6), alg, private)


@dataclass
class IssuerServer:
    host: str
    keys: list[Key] = field(default_factory=lambda: [new_key("RS256", "rsa-1"), new_key("ES256", "ec-1"),
                                                     new_key("EdDSA", "ed-1")])
    port: int = 0
    jwks_hits: int = 0
    login_subject: str = "carol"
    login_claims: dict[str, Any] = field(default_factory=dict)
    _codes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port}/realm"

    def provider_settings(self, **extra: Any) -> dict[str, Any]:
        return {"name": "testidp", "issuer": self.issuer, "audience": [AUDIENCE], "client_id": CLIENT_ID,
                "allow_http": True, "jwks_min_refresh_s": 30, **extra}

    def mint(self, subject: str = "alice", *, key: Key | None = None, alg: str | None = None,
             kid: str | None = None, ttl: float = 300, **claims: Any) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        body = {"iss": self.issuer, "aud": AUDIENCE, "sub": subject, "iat": now, "nbf": now,
                "exp": now + int(ttl), **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key.private, algorithm=alg or key.alg,
                          headers={"kid": kid if kid is not None else key.kid})

    # HTTP -----------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/realm/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/realm/jwks", self._jwks)
        app.router.add_get("/realm/authorize", self._authorize)
        app.router.add_post("/realm/token", self._token)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        base = self.issuer
        return web.json_response({"issuer": base, "jwks_uri": f"{base}/jwks",
                                  "authorization_endpoint": f"{base}/authorize",
                                  "token_endpoint": f"{base}/token",
                                  "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"]})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response({"keys": [k.jwk() for k in self.keys]})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID
        assert q["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self._codes[code] = {"challenge": q["code_challenge"], "nonce": q["nonce"],
                             "redirect_uri": q["redirect_uri"]}
        raise web.HTTPFound(f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}")

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        pending = self._codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier", ""))
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if pending is None or digest != pending["challenge"] or \
                form.get("redirect_uri") != pending["redirect_uri"]:
            return web.json_response({"error": "invalid_grant"}, status=400)
        id_token = self.mint(self.login_subject, aud=CLIENT_ID, nonce=pending["nonce"], **self.login_claims)
        return web.json_response({"id_token": id_token, "access_token": "opaque", "token_type": "Bearer"})


@asynccontextmanager
async def running_issuer(host: str, issuer: IssuerServer | None = None) -> AsyncIterator[IssuerServer]:
    issuer = issuer or IssuerServer(host)
    runner = web.AppRunner(issuer.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    issuer.port = runner.addresses[0][1]
    try:
        yield issuer
    finally:
        await runner.cleanup()
