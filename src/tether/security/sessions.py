"""Console sessions: server-side records, so a session can be ended at once (sign-out, an operator
disabled, a password changed) and a stolen database holds no usable session.

The browser holds only a random 256-bit token in an HttpOnly cookie; the database keeps its SHA-256,
the operator (`issuer`, `subject`), the claim grants captured at sign-in (OIDC roles; local roles
are re-read on every request) and an absolute expiry. Each session also has a CSRF token that the
console sends in a header on every change (the api layer compares it, constant-time).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from tether.registry.models import utcnow
from tether.security.roles import RoleGrant
from tether.storage.sql.operators import SessionRecord, SqlOperatorRepository

__all__ = ["SessionService", "token_hash"]

MAX_DISPLAY = 255


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionService:
    def __init__(self, repo: SqlOperatorRepository, *, ttl_s: int,
                 now: Callable[[], datetime] = utcnow) -> None:
        self._repo = repo
        self._ttl = timedelta(seconds=ttl_s)
        self._now = now

    async def create(self, *, issuer: str, subject: str, display_name: str | None,
                     claim_grants: tuple[RoleGrant, ...] = ()) -> tuple[str, SessionRecord]:
        """A new session; returns the token (for the cookie, never stored) and the record."""
        token = secrets.token_urlsafe(32)
        now = self._now()
        record = SessionRecord(
            token_hash=token_hash(token), issuer=issuer[:512], subject=subject[:255],
            display_name=display_name[:MAX_DISPLAY] if display_name else None,
            csrf_token=secrets.token_urlsafe(32), grants=[g.to_json() for g in claim_grants],
            created=now, expires=now + self._ttl,
        )
        await self._repo.insert_session(record)
        return token, record

    async def lookup(self, token: str) -> SessionRecord | None:
        """The live session for a cookie token; None when unknown, ended or expired."""
        if not token or len(token) > 128:
            return None
        record = await self._repo.get_session(token_hash(token))
        if record is None:
            return None
        if record.expires <= self._now():
            await self._repo.delete_session(record.token_hash)
            return None
        return record

    async def end(self, token: str) -> bool:
        return await self._repo.delete_session(token_hash(token))

    async def end_all(self, issuer: str, subject: str) -> int:
        return await self._repo.delete_sessions_of(issuer, subject)

    async def sweep(self) -> int:
        return await self._repo.delete_expired_sessions(self._now())
