"""Local operators: people who sign in to the console (or the REST API through a session) with a
password held by Tether, for installations without a directory.

* Passwords are stored as argon2id hashes (argon2-cffi, RFC 9106 low-memory parameters), checked in a
  worker thread so a sign-in never stalls the event loop; at most two hashes run at once, which bounds
  the memory (64 MiB each) an unauthenticated peer can make the hub spend. An unknown name costs the
  same hash as a known one.
* Optional TOTP second factor (`tether.security.totp`); a code is accepted once.
* After `lockout_threshold` consecutive failures (wrong password or wrong code) the operator is locked
  for `lockout_s`: every sign-in is refused (`locked-out`) without looking at the password. The lockout
  is audited (`operator.lockout`); a successful sign-in or a password reset clears the counter.
* Disabling an operator ends their sessions at once (the `on_revoke` callback).

Every change is audited (`operator.create`, `operator.password`, `operator.disable`, `operator.enable`,
`operator.totp`); passwords and TOTP secrets never reach the audit log or a log line.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tether.errors import BadRequest, NotFound
from tether.registry.models import utcnow
from tether.security import totp
from tether.security.audit import AuditSink
from tether.security.principal import AuthRefused
from tether.storage.sql.operators import OperatorRecord, SqlOperatorRepository

__all__ = ["LOCAL_ISSUER", "USERNAME_RE", "OperatorService", "validate_password", "validate_username"]

LOCAL_ISSUER = "local"
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
_HASHER = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4
_DUMMY_HASH = _HASHER.hash("tether-dummy-password")


def validate_username(name: str) -> str:
    if not isinstance(name, str) or not USERNAME_RE.fullmatch(name):
        raise BadRequest("operator names are 1-64 letters, digits and _ . @ - (starting alphanumeric)",
                         field="username")
    return name


def validate_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(f"passwords need {MIN_PASSWORD}-{MAX_PASSWORD} characters", field="password")
    return password


def _check(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class OperatorService:
    """Validated, audited access to local operator accounts."""

    def __init__(
        self,
        repo: SqlOperatorRepository,
        audit: AuditSink,
        *,
        lockout_threshold: int = 5,
        lockout_s: int = 900,
        now: Callable[[], datetime] = utcnow,
        on_revoke: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self._repo = repo
        self._audit = audit
        self._threshold = lockout_threshold
        self._lockout = timedelta(seconds=lockout_s)
        self._now = now
        self.on_revoke = on_revoke  # ends the sessions of a username (set by the hub)
        self._hashing = asyncio.Semaphore(2)  # bounds hashing memory (64 MiB each) and threads

    async def _hash(self, password: str) -> str:
        async with self._hashing:
            return await asyncio.to_thread(_HASHER.hash, password)

    async def _verify(self, stored: str, password: str) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(_check, stored, password)

    async def list(self) -> list[OperatorRecord]:
        return await self._repo.list_operators()

    async def find(self, username: str) -> OperatorRecord | None:
        """None for unknown or malformed names (names arrive from sessions and sign-in forms)."""
        return await self._repo.get_operator(username) if USERNAME_RE.fullmatch(username or "") else None

    async def get(self, username: str) -> OperatorRecord:
        record = await self._repo.get_operator(validate_username(username))
        if record is None:
            raise NotFound(f"operator {username!r} not found", code="OperatorNotFound", field="username")
        return record

    async def add(self, username: str, password: str, *, with_totp: bool = False,
                  actor: str) -> tuple[OperatorRecord, str | None]:
        """Create an operator; returns the TOTP secret (shown once) when `with_totp`."""
        validate_username(username)
        validate_password(password)
        now = self._now()
        secret = totp.generate_secret() if with_totp else None
        hashed = await self._hash(password)
        record = OperatorRecord(username=username, password_hash=hashed, totp_secret=secret,
                                totp_last_step=None, disabled=False, failed_logins=0, locked_until=None,
                                created=now, updated=now)
        await self._repo.insert_operator(record)
        await self._changed("operator.create", username, actor, {"totp": with_totp})
        return record, secret

    async def set_password(self, username: str, password: str, *, actor: str) -> None:
        """New password; clears a lockout and ends the operator's sessions."""
        await self.get(username)
        validate_password(password)
        await self._repo.update_operator(username, password_hash=await self._hash(password), failed_logins=0,
                                         locked_until=None, updated=self._now())
        await self._changed("operator.password", username, actor, None)
        await self._revoke(username)

    async def set_totp(self, username: str, enabled: bool, *, actor: str) -> str | None:
        """Turn the second factor on (a new secret, returned once) or off."""
        await self.get(username)
        secret = totp.generate_secret() if enabled else None
        await self._repo.update_operator(username, totp_secret=secret, totp_last_step=None,
                                         updated=self._now())
        await self._changed("operator.totp", username, actor, {"enabled": enabled})
        await self._revoke(username)
        return secret

    async def set_disabled(self, username: str, disabled: bool, *, actor: str) -> None:
        """Disable (ending every session at once) or enable an operator."""
        await self.get(username)
        await self._repo.update_operator(username, disabled=disabled, updated=self._now())
        await self._changed("operator.disable" if disabled else "operator.enable", username, actor, None)
        if disabled:
            await self._revoke(username)

    async def check(self, username: str, password: str, code: str | None) -> OperatorRecord:
        """The operator, if the password (and TOTP code, when enrolled) are right; else `AuthRefused`
        (`bad-credentials`, `locked-out`, `totp-required`, `bad-totp`, `operator-disabled`)."""
        record = await self.find(username)
        if record is None or not password or len(password) > MAX_PASSWORD:
            await self._verify(_DUMMY_HASH, password[:MAX_PASSWORD] if password else "x")
            raise AuthRefused("bad-credentials", "unknown operator or wrong password")
        now = self._now()
        if record.locked_until is not None and record.locked_until > now:
            raise AuthRefused("locked-out", "too many failed sign-ins; try again later")
        if not await self._verify(record.password_hash, password):
            await self._failed(record, now)
            raise AuthRefused("bad-credentials", "unknown operator or wrong password")
        if record.totp_secret:
            if not code:
                raise AuthRefused("totp-required", "enter the code from your authenticator app")
            step = totp.verify(record.totp_secret, code, at=now.timestamp())
            if step is None or not await self._repo.use_totp_step(username, step):
                await self._failed(record, now)
                raise AuthRefused("bad-totp", "wrong or already used code")
        if record.disabled:
            raise AuthRefused("operator-disabled", "this operator is disabled", not_authorized=True)
        if record.failed_logins or record.locked_until is not None:
            await self._repo.update_operator(username, failed_logins=0, locked_until=None)
        if _HASHER.check_needs_rehash(record.password_hash):
            await self._repo.update_operator(username, password_hash=await self._hash(password))
        return record

    async def _failed(self, record: OperatorRecord, now: datetime) -> None:
        failures = record.failed_logins + 1
        if failures < self._threshold:
            await self._repo.update_operator(record.username, failed_logins=failures)
            return
        until = now + self._lockout
        await self._repo.update_operator(record.username, failed_logins=0, locked_until=until)
        await self._audit.record("operator.lockout", "ok", principal=f"user:{record.username}",
                                 credential="password", reason="too-many-failures", target=record.username,
                                 details={"issuer": LOCAL_ISSUER, "failures": failures,
                                          "until": until.isoformat()})

    async def _revoke(self, username: str) -> None:
        if self.on_revoke is not None:
            await self.on_revoke(username)

    async def _changed(self, action: str, username: str, actor: str,
                       details: dict[str, object] | None) -> None:
        await self._audit.record(action, "ok", principal=actor, target=username,
                                 details={"issuer": LOCAL_ISSUER, **(details or {})})
