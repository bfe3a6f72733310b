"""Symmetric key generation: base64 of 32 random bytes from the OS CSPRNG, the shape Azure uses."""

from __future__ import annotations

import base64
import secrets

KEY_BYTES = 32


def generate_key(nbytes: int = KEY_BYTES) -> str:
    """A fresh shared access key (device or policy). Never log the result."""
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


__all__ = ["KEY_BYTES", "generate_key"]
