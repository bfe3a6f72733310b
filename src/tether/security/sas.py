"""Shared Access Signature tokens in exactly Azure IoT Hub's format: the one place that builds,
parses and verifies them.

Wire format: ``SharedAccessSignature sr={urlenc(resource)}&sig={urlenc(sig)}&se={expiry}[&skn={policy}]``
with ``sig = base64(HMAC-SHA256(base64decode(key), urlenc(resource) + "\\n" + str(expiry)))``.

The SDKs disagree on percent-encoding (azure-iot-device uses ``quote(safe="")`` everywhere,
azure-iot-hub uses ``quote_plus`` for ``sr`` and ``quote`` for ``sig``, leaving ``/`` raw), so every
field is URL-decoded and the string to sign is rebuilt from the decoded resource with
``quote(safe="")``. As a compatibility fallback the ``sr`` text exactly as transmitted is also tried
(clients such as .NET's ``WebUtility.UrlEncode`` leave ``( ) ! *`` unescaped); this grants nothing
extra, because the signer must have signed that very text and it decodes to one resource only.

Time rules (Azure tokens carry no start time):

* expired when ``se + clock_skew < now``;
* refused as ``lifetime-too-long`` when ``se > now + max_lifetime + clock_skew`` (default max
  lifetime 365 days), so a leaked token cannot live forever.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

from tether.security.keys import generate_key  # re-exported: one key generator for the hub

__all__ = [
    "DEFAULT_CLOCK_SKEW_S",
    "DEFAULT_MAX_LIFETIME_S",
    "MAX_TOKEN_LENGTH",
    "PREFIX",
    "SasError",
    "SasToken",
    "TokenVerifier",
    "build_token",
    "encode_resource",
    "generate_key",
    "parse_token",
    "same_hub_host",
    "scope_covers",
    "sign",
    "verify_signature",
]

PREFIX = "SharedAccessSignature "
MAX_TOKEN_LENGTH = 4096
DEFAULT_CLOCK_SKEW_S = 300
DEFAULT_MAX_LIFETIME_S = 365 * 24 * 3600
SIGNATURE_BYTES = 32  # HMAC-SHA256

_REQUIRED = ("sr", "sig", "se")
_ALLOWED = frozenset((*_REQUIRED, "skn"))
_EXPIRY_RE = re.compile(r"[0-9]{1,15}")
# Printable ASCII without space: resource URIs and policy names never contain anything else.
_PRINTABLE_RE = re.compile(r"[\x21-\x7e]+")
_RAW_TOKEN_RE = re.compile(r"[\x20-\x7e]*")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class SasError(Exception):
    """A token was refused. `reason` is a short slug for audit/metrics ("malformed", "expired",
    "lifetime-too-long", "bad-signature"); `detail` is human text that never quotes the token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SasToken:
    """A parsed token. `resource` is URL-decoded; `encoded_resource` is the `sr` text as sent
    (used only as the signature fallback described in the module docstring)."""

    resource: str
    signature: bytes = field(repr=False)
    expiry: int
    policy_name: str | None = None
    encoded_resource: str | None = field(default=None, repr=False, compare=False)

    @property
    def host(self) -> str:
        """The host part of the resource (may include ":port"), as sent."""
        return self.resource.split("/", 1)[0]


def encode_resource(resource_uri: str) -> str:
    """Canonical percent-encoding of a resource URI (every reserved character, `/` included)."""
    return quote(resource_uri, safe="")


def _decode_key(key: str) -> bytes | None:
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None


def sign(encoded_resource: str, expiry: int | str, key: str) -> bytes:
    """Raw HMAC-SHA256 signature of `encoded_resource + "\\n" + expiry` with a base64 key."""
    raw = _decode_key(key)
    if raw is None:
        raise ValueError("key must be base64")
    message = f"{encoded_resource}\n{expiry}".encode()
    return hmac.new(raw, message, hashlib.sha256).digest()


def build_token(resource_uri: str, key: str, expiry: int, policy_name: str | None = None) -> str:
    """Build a token exactly as azure-iot-device does (fields `sr, sig, se[, skn]`)."""
    if expiry < 0:
        raise ValueError("expiry must be non-negative")
    sr = encode_resource(resource_uri)
    sig = base64.b64encode(sign(sr, expiry, key)).decode("ascii")
    token = f"{PREFIX}sr={sr}&sig={quote(sig, safe='')}&se={expiry}"
    if policy_name is not None:
        token += f"&skn={quote(policy_name, safe='')}"
    return token


def _unquote_ascii(value: str, name: str) -> str:
    try:
        text = unquote_to_bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise SasError("malformed", f"field {name} is not ASCII") from None
    if not _PRINTABLE_RE.fullmatch(text):
        raise SasError("malformed", f"field {name} is empty or has control characters")
    return text


def parse_token(token: str) -> SasToken:
    """Parse a token string. Raises only `SasError("malformed", …)`.

    Field order is free; every field is URL-decoded; missing, duplicated, unknown or empty fields,
    a non-integer `se`, a signature that is not base64 of 32 bytes, non-ASCII text, a wrong prefix
    and tokens over 4 KB are all refused.
    """
    if not isinstance(token, str):
        raise SasError("malformed", "token is not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise SasError("malformed", "token too long")
    if not _RAW_TOKEN_RE.fullmatch(token):
        raise SasError("malformed", "token has non-ASCII or control characters")
    if not token.startswith(PREFIX):
        raise SasError("malformed", "missing SharedAccessSignature prefix")
    fields: dict[str, str] = {}
    for part in token[len(PREFIX) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep:
            raise SasError("malformed", "field without '='")
        if name not in _ALLOWED:
            raise SasError("malformed", "unknown field")
        if name in fields:
            raise SasError("malformed", f"duplicated field {name}")
        if not value:
            raise SasError("malformed", f"empty field {name}")
        fields[name] = value
    for name in _REQUIRED:
        if name not in fields:
            raise SasError("malformed", f"missing field {name}")

    resource = _unquote_ascii(fields["sr"], "sr")
    expiry_text = _unquote_ascii(fields["se"], "se")
    if not _EXPIRY_RE.fullmatch(expiry_text):
        raise SasError("malformed", "se is not a non-negative integer")
    sig_text = _unquote_ascii(fields["sig"], "sig")
    if not _BASE64_RE.fullmatch(sig_text):
        raise SasError("malformed", "sig is not base64")
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        raise SasError("malformed", "sig is not base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise SasError("malformed", "sig has the wrong length")
    policy = _unquote_ascii(fields["skn"], "skn") if "skn" in fields else None
    return SasToken(
        resource=resource,
        signature=signature,
        expiry=int(expiry_text),
        policy_name=policy,
        encoded_resource=fields["sr"],
    )


def verify_signature(token: SasToken, keys: Sequence[str | None]) -> bool:
    """True when any key (primary or secondary) signed the token. Every key is tried and compared
    with `hmac.compare_digest`, so timing does not reveal which one matched. Empty/invalid keys are
    skipped."""
    encodings = [encode_resource(token.resource)]
    if token.encoded_resource and token.encoded_resource != encodings[0]:
        encodings.append(token.encoded_resource)
    matched = False
    for key in keys:
        raw = _decode_key(key) if key else None
        if not raw:
            continue
        for sr in encodings:
            expected = hmac.new(raw, f"{sr}\n{token.expiry}".encode(), hashlib.sha256).digest()
            matched |= hmac.compare_digest(expected, token.signature)
    return matched


def _split_resource(resource: str) -> tuple[str, list[str]] | None:
    if resource.endswith("/"):
        resource = resource[:-1]
    parts = resource.split("/")
    if "" in parts:  # segments compare literally ("." and ".." are valid device ids)
        return None
    return parts[0].lower(), parts[1:]


def scope_covers(token_resource: str, target_resource: str) -> bool:
    """True when a token for `token_resource` grants `target_resource`: same host (case-insensitive)
    and the token's path is a prefix of the target's on segment boundaries (case-sensitive), so
    `h/devices/ab` covers `h/devices/ab/modules/m` but not `h/devices/abc`. One trailing `/` on
    either side is ignored."""
    token = _split_resource(token_resource)
    target = _split_resource(target_resource)
    if token is None or target is None:
        return False
    (token_host, token_path), (target_host, target_path) = token, target
    return token_host == target_host and target_path[: len(token_path)] == token_path


class TokenVerifier:
    """The time and signature rules in one object, so every surface applies the same policy."""

    def __init__(
        self,
        *,
        clock_skew_s: int = DEFAULT_CLOCK_SKEW_S,
        max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        if clock_skew_s < 0 or max_lifetime_s <= 0:
            raise ValueError("clock_skew_s must be >= 0 and max_lifetime_s > 0")
        self.clock_skew_s = clock_skew_s
        self.max_lifetime_s = max_lifetime_s
        self._now = now

    def check_time(self, token: SasToken) -> None:
        """Raise `SasError("expired")` or `SasError("lifetime-too-long")`."""
        now = self._now()
        if token.expiry + self.clock_skew_s < now:
            raise SasError("expired", "token expiry is in the past")
        if token.expiry > now + self.max_lifetime_s + self.clock_skew_s:
            raise SasError("lifetime-too-long", "token expiry is beyond the maximum lifetime")

    def check_signature(self, token: SasToken, keys: Sequence[str | None]) -> None:
        if not verify_signature(token, keys):
            raise SasError("bad-signature", "signature does not match any key")

    def verify(self, token: SasToken, keys: Sequence[str | None]) -> None:
        """Time rules, then signature; raises `SasError`."""
        self.check_time(token)
        self.check_signature(token, keys)


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, sep, port = host.partition(":")
    if sep and port.isdigit() and ":" not in port:
        return name
    return host


def same_hub_host(a: str, b: str) -> bool:
    """Whether two host names name the same hub: case-insensitive, a `:port` on either side ignored
    (the service SDK signs `localhost:8443` while devices sign `localhost`; MQTT usernames too)."""
    a, b = a.lower(), b.lower()
    return a == b or _strip_port(a) == _strip_port(b)
