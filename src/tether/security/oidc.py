"""Verify OpenID Connect tokens (bearer access tokens, ID tokens) from a configured provider.

`OidcProvider` reads the provider's discovery document (`{issuer}/.well-known/openid-configuration`)
and its JWKS, and checks a token strictly:

* `alg` must be RS256, ES256 or EdDSA — `none`, every HMAC algorithm and anything else is refused
  before a key is looked at (`alg-not-allowed`), so a token "signed" with the public key as an HMAC
  secret never reaches a verifier; the key chosen must also be of the algorithm's type (RSA, EC
  P-256, OKP Ed25519) and, if the JWK names an `alg`, that one (`key-mismatch`).
* the key is found by `kid` in the cached JWKS. An unknown `kid` re-reads the JWKS (key rotation),
  at most once per `jwks_min_refresh_s`: forged tokens with random `kid`s cannot make the hub hammer
  the provider (`unknown-key`). The JWKS is also re-read once it is `jwks_cache_s` old.
* signature, then `iss` (exact), `aud` (one of the accepted audiences), `exp`, `nbf` and `iat` with
  `clock_skew_s` of tolerance; `exp`, `iss`, `aud` and the subject claim are required.

Refusals raise `AuthRefused` with a slug (`wrong-issuer`, `wrong-audience`, `expired`,
`not-yet-valid`, `bad-signature`, `alg-not-allowed`, `unknown-key`, `key-mismatch`, `malformed`,
`missing-claim`, `provider-unavailable`); the caller (the authenticator) audits them. Responses from
the provider are bounded in size and time. PyJWT does the JOSE work (docs/decisions/0010).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from jwt.algorithms import get_default_algorithms

from tether.config import OidcProviderSettings
from tether.security.principal import AuthRefused

__all__ = ["ALLOWED_ALGORITHMS", "OidcProvider", "claim_at", "unverified_issuer"]

ALLOWED_ALGORITHMS = ("RS256", "ES256", "EdDSA")
_KEY_TYPES = {"RS256": ("RSA", None), "ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}
MAX_DOCUMENT_BYTES = 256 * 1024
FETCH_TIMEOUT_S = 10.0
DISCOVERY_CACHE_S = 3600.0
MAX_TOKEN_CHARS = 16_384


def unverified_issuer(token: str) -> str | None:
    """The `iss` a token claims (unverified: only to pick the provider that will verify it)."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """`realm_access.roles` → claims["realm_access"]["roles"] (None when absent)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class OidcProvider:
    """One provider's discovery document and keys, and the token checks against them."""

    def __init__(
        self,
        settings: OidcProviderSettings,
        *,
        now: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.issuer = settings.issuer
        self._now = now
        self._clock = clock
        self._discovery: dict[str, Any] | None = None
        self._discovered_at = 0.0
        self._keys: dict[str, jwt.PyJWK] = {}  # by kid ("" for a key without one)
        self._jwks_at: float | None = None  # monotonic time of the last JWKS read (success or not)
        self._lock = asyncio.Lock()
        self.jwks_fetches = 0  # for operators' curiosity and tests

    # Provider documents ---------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.settings.ca_file))
        return httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, verify=verify, follow_redirects=False)

    async def _get_json(self, url: str) -> dict[str, Any]:
        if not url.startswith("https://") and not (self.settings.allow_http and url.startswith("http://")):
            raise AuthRefused("provider-unavailable", "provider URLs must be https://")
        try:
            async with self._client() as client, client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise AuthRefused("provider-unavailable", f"{url} answered {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise AuthRefused("provider-unavailable", f"{url} answered too much")
            doc = json.loads(bytes(body))
        except (httpx.HTTPError, ssl.SSLError, OSError, ValueError) as exc:
            raise AuthRefused("provider-unavailable", f"cannot read {url}: {type(exc).__name__}") from None
        if not isinstance(doc, dict):
            raise AuthRefused("provider-unavailable", f"{url} is not a JSON object")
        return doc

    async def discovery(self) -> dict[str, Any]:
        """The discovery document (cached for an hour); its `issuer` must be ours exactly."""
        if self._discovery is not None and self._clock() - self._discovered_at < DISCOVERY_CACHE_S:
            return self._discovery
        doc = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != self.issuer or not isinstance(doc.get("jwks_uri"), str):
            raise AuthRefused("provider-unavailable", "discovery document names another issuer or no JWKS")
        self._discovery, self._discovered_at = doc, self._clock()
        return doc

    async def endpoint(self, name: str) -> str:
        """`authorization_endpoint`, `token_endpoint`, … from discovery."""
        value = (await self.discovery()).get(name)
        if not isinstance(value, str):
            raise AuthRefused("provider-unavailable", f"discovery has no {name}")
        return value

    async def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> str:
        """Authorization code + PKCE → the ID token (verified by the caller with `verify`)."""
        url = await self.endpoint("token_endpoint")
        if not url.startswith("https://") and not (self.settings.allow_http and url.startswith("http://")):
            raise AuthRefused("provider-unavailable", "provider URLs must be https://")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": self.settings.client_id or "", "code_verifier": code_verifier}
        if self.settings.client_secret:
            form["client_secret"] = self.settings.client_secret
        try:
            async with self._client() as client:
                response = await client.post(url, data=form, headers={"Accept": "application/json"})
            if len(response.content) > MAX_DOCUMENT_BYTES:
                raise AuthRefused("provider-unavailable", "token endpoint answered too much")
            doc = response.json()
        except (httpx.HTTPError, ssl.SSLError, OSError, ValueError) as exc:
            raise AuthRefused("provider-unavailable", f"token endpoint: {type(exc).__name__}") from None
        if response.status_code != 200 or not isinstance(doc, dict):
            raise AuthRefused("code-refused", f"token endpoint answered {response.status_code}")
        id_token = doc.get("id_token")
        if not isinstance(id_token, str):
            raise AuthRefused("code-refused", "token endpoint returned no id_token")
        return id_token

    async def _refresh_keys(self) -> None:
        self._jwks_at = self._clock()  # counts even when the read fails: failures are rate-limited too
        self.jwks_fetches += 1
        doc = await self._get_json(await self.endpoint("jwks_uri"))
        keys: dict[str, jwt.PyJWK] = {}
        for entry in doc.get("keys", []) if isinstance(doc.get("keys"), list) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # a key type we do not use (or a broken entry) must not hide the others
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys

    async def _key(self, kid: str) -> jwt.PyJWK:
        async with self._lock:
            stale = self._jwks_at is None or self._clock() - self._jwks_at >= self.settings.jwks_cache_s
            if stale:
                try:
                    await self._refresh_keys()
                except AuthRefused:
                    if not self._keys:
                        raise  # nothing cached: the provider must answer first
                    # the provider is unreachable: keep verifying with the keys we have
            key = self._keys.get(kid)
            if key is not None:
                return key
            assert self._jwks_at is not None
            if not stale and self._clock() - self._jwks_at >= self.settings.jwks_min_refresh_s:
                await self._refresh_keys()  # rotation: the provider may have published a new key
                key = self._keys.get(kid)
            if key is None:
                raise AuthRefused("unknown-key", "no key with this kid (JWKS re-read is rate-limited)")
            return key

    # Tokens -------------------------------------------------------------------------------------
    async def verify(self, token: str, *, audiences: list[str], nonce: str | None = None) -> dict[str, Any]:
        """The verified claims, or `AuthRefused`."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthRefused("malformed", "not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthRefused("malformed", "not a JWT") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthRefused("alg-not-allowed", f"alg must be one of {', '.join(ALLOWED_ALGORITHMS)}")
        kid = header.get("kid", "")
        if not isinstance(kid, str) or len(kid) > 256:
            raise AuthRefused("malformed", "bad kid")
        key = await self._key(kid)
        _check_key_type(key, alg)
        if not audiences:
            raise AuthRefused("wrong-audience", "no audience is configured for this provider")
        subject_claim = self.settings.subject_claim
        skew = self.settings.clock_skew_s
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key.key, algorithms=[alg], audience=audiences, issuer=self.issuer, leeway=skew,
                options={"require": ["exp", "iss", "aud", subject_claim], "verify_iat": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthRefused("expired", "token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthRefused("not-yet-valid", "token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthRefused("wrong-audience", "token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthRefused("wrong-issuer", "token from another issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthRefused("bad-signature", "signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthRefused("missing-claim", f"token lacks {exc.claim}") from None
        except jwt.PyJWTError:
            raise AuthRefused("malformed", "token does not decode") from None
        # PyJWT checks iat only for type; a token issued in the future is not yet valid either.
        iat = claims.get("iat")
        if isinstance(iat, int | float) and iat > self._now() + skew:
            raise AuthRefused("not-yet-valid", "token issued in the future")
        if not isinstance(claims.get(subject_claim), str) or not claims[subject_claim]:
            raise AuthRefused("missing-claim", f"token lacks {subject_claim}")
        if nonce is not None and claims.get("nonce") != nonce:
            raise AuthRefused("bad-nonce", "ID token nonce does not match the sign-in")
        return claims


def _check_key_type(key: jwt.PyJWK, alg: str) -> None:
    kty, crv = _KEY_TYPES[alg]
    jwk = getattr(key, "_jwk_data", {})
    named = jwk.get("alg")
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv) or (named and named != alg):
        raise AuthRefused("key-mismatch", "the key named by kid is not a key for this alg")
    if alg not in get_default_algorithms():
        raise AuthRefused("alg-not-allowed", f"{alg} is not available")
