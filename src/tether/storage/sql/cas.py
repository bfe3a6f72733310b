"""Registered certificate authorities (Azure's "certificates" blade): one row per CA, with its proof-of-
possession state and optional CRL.

The table lives on its own `MetaData` (created by migration 0002_certificate_authorities) so this module
stays independent of the device/policy tables. Every write is a single statement, so on SQLite no
transaction ever upgrades a read lock to a write lock, and `update` is a compare-and-set when
`expected_code` is given (two concurrent proofs cannot both consume one verification code).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tether.errors import Conflict

__all__ = ["CaRecord", "CaRepository", "SqlCaRepository", "ca_metadata", "certificate_authorities"]

ca_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

certificate_authorities = Table(
    "certificate_authorities",
    ca_metadata,
    Column(
        "name",
        String(128).with_variant(String(128, collation="C"), "postgresql"),
        primary_key=True,
    ),
    Column("certificate", Text, nullable=False),  # PEM
    Column("thumbprint", String(64), nullable=False),  # SHA-1 uppercase hex, as Azure shows it
    Column("verified", Boolean, nullable=False),
    Column("verification_code", String(128), nullable=True),
    Column("crl", Text, nullable=True),  # PEM
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    UniqueConstraint("thumbprint"),
)


@dataclass(frozen=True, slots=True)
class CaRecord:
    name: str
    certificate_pem: str
    thumbprint: str
    verified: bool
    verification_code: str | None
    crl_pem: str | None
    created: datetime
    updated: datetime


class CaRepository(Protocol):
    async def get(self, name: str) -> CaRecord | None: ...
    async def list(self) -> list[CaRecord]: ...
    async def insert(self, record: CaRecord) -> None: ...  # Conflict on a duplicate name or thumbprint
    async def update(self, record: CaRecord, *, expected_code: str | None = None) -> bool: ...
    async def delete(self, name: str) -> bool: ...


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything Tether stores is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _to_db(value: datetime, dialect: str) -> datetime:
    value = value.astimezone(UTC)
    return value.replace(tzinfo=None) if dialect == "sqlite" else value


def _row(row: Any) -> CaRecord:
    return CaRecord(
        name=row.name,
        certificate_pem=row.certificate,
        thumbprint=row.thumbprint,
        verified=bool(row.verified),
        verification_code=row.verification_code,
        crl_pem=row.crl,
        created=_utc(row.created),
        updated=_utc(row.updated),
    )


class SqlCaRepository:
    """CA records on SQLite or PostgreSQL through an `AsyncEngine`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    def _values(self, record: CaRecord) -> dict[str, Any]:
        return {
            "name": record.name,
            "certificate": record.certificate_pem,
            "thumbprint": record.thumbprint,
            "verified": record.verified,
            "verification_code": record.verification_code,
            "crl": record.crl_pem,
            "created": _to_db(record.created, self._dialect),
            "updated": _to_db(record.updated, self._dialect),
        }

    async def get(self, name: str) -> CaRecord | None:
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(certificate_authorities).where(certificate_authorities.c.name == name)
            )
            row = result.first()
        return _row(row) if row is not None else None

    async def list(self) -> list[CaRecord]:
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(certificate_authorities).order_by(certificate_authorities.c.name)
            )
            return [_row(r) for r in result]

    async def insert(self, record: CaRecord) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(certificate_authorities).values(**self._values(record)))
        except IntegrityError as exc:
            raise Conflict(
                f"certificate {record.name!r} (or one with the same thumbprint) already exists",
                code="CertificateAlreadyExists",
            ) from exc

    async def update(self, record: CaRecord, *, expected_code: str | None = None) -> bool:
        """Write every mutable column; with `expected_code` only if the stored code still equals it."""
        values = self._values(record)
        del values["name"], values["created"]
        stmt = update(certificate_authorities).where(certificate_authorities.c.name == record.name)
        if expected_code is not None:
            stmt = stmt.where(certificate_authorities.c.verification_code == expected_code)
        async with self._engine.begin() as conn:
            result = await conn.execute(stmt.values(**values))
        return bool(result.rowcount)

    async def delete(self, name: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(certificate_authorities).where(certificate_authorities.c.name == name)
            )
        return bool(result.rowcount)

    async def create_table(self) -> None:
        """For tests and throwaway databases; real deployments run the Alembic migrations."""
        async with self._engine.begin() as conn:
            await conn.run_sync(ca_metadata.create_all)
