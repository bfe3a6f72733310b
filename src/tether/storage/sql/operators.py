"""Operators in SQL: local operator accounts, console sessions and role assignments (migration
0006_operators). The tables live on their own `MetaData`, so this module stays independent of the
device and policy tables.

Passwords are stored only as argon2id hashes, sessions only by the SHA-256 of their token (a database
reader cannot ride a live session); TOTP secrets are stored as given (they must be usable) and so
share the database's protection, like device keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from tether.errors import Conflict, NotFound
from tether.storage.sql.engine import Database
from tether.storage.sql.tables import NAMING_CONVENTION, UtcDateTime, ident

__all__ = [
    "OperatorRecord",
    "RoleAssignmentRecord",
    "SessionRecord",
    "SqlOperatorRepository",
    "operator_metadata",
]

operator_metadata = MetaData(naming_convention=NAMING_CONVENTION)

operators = Table(
    "operators",
    operator_metadata,
    Column("username", ident(64), primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("totp_secret", Text, nullable=True),
    Column("totp_last_step", BigInteger, nullable=True),  # a code is accepted once
    Column("disabled", Boolean, nullable=False),
    Column("failed_logins", Integer, nullable=False),
    Column("locked_until", UtcDateTime(), nullable=True),
    Column("created", UtcDateTime(), nullable=False),
    Column("updated", UtcDateTime(), nullable=False),
)

operator_sessions = Table(
    "operator_sessions",
    operator_metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("issuer", String(512), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("display_name", String(255), nullable=True),
    Column("csrf_token", String(64), nullable=False),
    Column("grants", Text, nullable=False),  # JSON list of claim grants captured at sign-in
    Column("created", UtcDateTime(), nullable=False),
    Column("expires", UtcDateTime(), nullable=False),
    Index("ix_operator_sessions_issuer_subject", "issuer", "subject"),
    Index("ix_operator_sessions_expires", "expires"),
)

role_assignments = Table(
    "role_assignments",
    operator_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("issuer", String(512), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("scope", Text, nullable=True),
    Column("created", UtcDateTime(), nullable=False),
    Column("created_by", Text, nullable=True),
    Index("ix_role_assignments_issuer_subject", "issuer", "subject"),
)


@dataclass(frozen=True, slots=True)
class OperatorRecord:
    username: str
    password_hash: str
    totp_secret: str | None
    totp_last_step: int | None
    disabled: bool
    failed_logins: int
    locked_until: datetime | None
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class SessionRecord:
    token_hash: str
    issuer: str
    subject: str
    display_name: str | None
    csrf_token: str
    grants: list[dict[str, Any]]
    created: datetime
    expires: datetime


@dataclass(frozen=True, slots=True)
class RoleAssignmentRecord:
    id: int
    issuer: str
    subject: str
    role: str
    scope: str | None
    created: datetime
    created_by: str | None


def _operator(row: Any) -> OperatorRecord:
    return OperatorRecord(**dict(row._mapping))


def _session(row: Any) -> SessionRecord:
    values = dict(row._mapping)
    values["grants"] = json.loads(values["grants"])
    return SessionRecord(**values)


def _assignment(row: Any) -> RoleAssignmentRecord:
    return RoleAssignmentRecord(**dict(row._mapping))


class SqlOperatorRepository:
    """Operators, sessions and role assignments over one `Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # operators ------------------------------------------------------------------------------------
    async def get_operator(self, username: str) -> OperatorRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(operators).where(operators.c.username == username))).first()
        return None if row is None else _operator(row)

    async def list_operators(self) -> list[OperatorRecord]:
        async with self._db.read() as conn:
            rows = (await conn.execute(select(operators).order_by(operators.c.username))).all()
        return [_operator(r) for r in rows]

    async def insert_operator(self, record: OperatorRecord) -> None:
        try:
            async with self._db.write() as conn:
                await conn.execute(insert(operators).values(
                    {f: getattr(record, f) for f in OperatorRecord.__dataclass_fields__}))
        except IntegrityError:
            raise Conflict(f"operator {record.username!r} already exists", code="OperatorAlreadyExists",
                           field="username") from None

    async def update_operator(self, username: str, **values: Any) -> None:
        async with self._db.write() as conn:
            result = await conn.execute(update(operators).where(operators.c.username == username)
                                        .values(values))
        if result.rowcount == 0:
            raise NotFound(f"operator {username!r} not found", code="OperatorNotFound", field="username")

    async def use_totp_step(self, username: str, step: int) -> bool:
        """Record `step` as used; False if it (or a later one) was used already (replay)."""
        col = operators.c.totp_last_step
        async with self._db.write() as conn:
            result = await conn.execute(
                update(operators)
                .where(operators.c.username == username, (col.is_(None)) | (col < step))
                .values(totp_last_step=step))
        return bool(result.rowcount)

    # sessions -------------------------------------------------------------------------------------
    async def insert_session(self, record: SessionRecord) -> None:
        values = {f: getattr(record, f) for f in SessionRecord.__dataclass_fields__}
        values["grants"] = json.dumps(record.grants)
        async with self._db.write() as conn:
            await conn.execute(insert(operator_sessions).values(values))

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(
                select(operator_sessions).where(operator_sessions.c.token_hash == token_hash))).first()
        return None if row is None else _session(row)

    async def delete_session(self, token_hash: str) -> bool:
        async with self._db.write() as conn:
            result = await conn.execute(
                delete(operator_sessions).where(operator_sessions.c.token_hash == token_hash))
        return bool(result.rowcount)

    async def delete_sessions_of(self, issuer: str, subject: str) -> int:
        async with self._db.write() as conn:
            result = await conn.execute(delete(operator_sessions).where(
                operator_sessions.c.issuer == issuer, operator_sessions.c.subject == subject))
        return int(result.rowcount)

    async def delete_expired_sessions(self, now: datetime) -> int:
        async with self._db.write() as conn:
            result = await conn.execute(delete(operator_sessions).where(operator_sessions.c.expires <= now))
        return int(result.rowcount)

    # role assignments -----------------------------------------------------------------------------
    async def insert_assignment(self, issuer: str, subject: str, role: str, scope: str | None,
                                created: datetime, created_by: str | None) -> RoleAssignmentRecord:
        async with self._db.write() as conn:
            result = await conn.execute(insert(role_assignments).values(
                issuer=issuer, subject=subject, role=role, scope=scope, created=created,
                created_by=created_by).returning(role_assignments.c.id))
            new_id = int(result.scalar_one())
        return RoleAssignmentRecord(new_id, issuer, subject, role, scope, created, created_by)

    async def list_assignments(self, issuer: str | None = None,
                               subject: str | None = None) -> list[RoleAssignmentRecord]:
        stmt = select(role_assignments).order_by(role_assignments.c.id)
        if issuer is not None:
            stmt = stmt.where(role_assignments.c.issuer == issuer)
        if subject is not None:
            stmt = stmt.where(role_assignments.c.subject == subject)
        async with self._db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_assignment(r) for r in rows]

    async def delete_assignment(self, assignment_id: int) -> RoleAssignmentRecord | None:
        async with self._db.write() as conn:
            row = (await conn.execute(
                select(role_assignments).where(role_assignments.c.id == assignment_id))).first()
            if row is None:
                return None
            await conn.execute(delete(role_assignments).where(role_assignments.c.id == assignment_id))
        return _assignment(row)
