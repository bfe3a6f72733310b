"""Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP), the optional second factor of local
operators. Authenticator apps use the defaults: SHA-1, 6 digits, 30-second steps, base32 secrets.

`verify` accepts the current step and one step either side (clock drift) and returns the step that
matched, so the caller can refuse a code that was already used (replay); comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
from urllib.parse import quote, urlencode

__all__ = ["generate_secret", "hotp", "provisioning_uri", "totp", "verify"]

STEP_S = 30
DIGITS = 6
_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def generate_secret() -> str:
    """A 160-bit secret, base32 without padding (what authenticator apps expect)."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").rstrip("=")


def _key(secret: str) -> bytes:
    text = secret.replace(" ", "").upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def hotp(key: bytes, counter: int, *, digits: int = DIGITS, digest: str = "sha1") -> str:
    """RFC 4226 section 5.3: dynamic truncation of HMAC(key, counter)."""
    mac = hmac.new(key, struct.pack(">Q", counter), _DIGESTS[digest]).digest()
    offset = mac[-1] & 0x0F
    code = (int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFF_FFFF) % 10**digits
    return str(code).zfill(digits)


def totp(secret: str, at: float, *, digits: int = DIGITS, digest: str = "sha1") -> str:
    return hotp(_key(secret), int(at) // STEP_S, digits=digits, digest=digest)


def verify(secret: str, code: str, *, at: float | None = None, window: int = 1) -> int | None:
    """The time step `code` is valid for (within ±`window` steps of `at`), or None."""
    code = code.strip().replace(" ", "")
    if not code.isdigit() or len(code) != DIGITS:
        return None
    key = _key(secret)
    now_step = int(time.time() if at is None else at) // STEP_S
    found: int | None = None
    for step in range(now_step - window, now_step + window + 1):
        if hmac.compare_digest(hotp(key, step), code) and found is None:  # no early exit
            found = step
    return found


def provisioning_uri(secret: str, account: str, issuer: str = "Tether") -> str:
    """`otpauth://totp/…` for a QR code or manual entry in an authenticator app."""
    query = urlencode({"secret": secret, "issuer": issuer, "algorithm": "SHA1", "digits": DIGITS,
                       "period": STEP_S})
    return f"otpauth://totp/{quote(issuer)}:{quote(account)}?{query}"
