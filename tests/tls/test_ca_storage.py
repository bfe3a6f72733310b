"""The certificate_authorities table through the real migration path, on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Connection

from tether.errors import Conflict
from tether.security import pki
from tether.security.x509 import CaService
from tether.storage.sql import SqlStorage
from tether.storage.sql.cas import CaRecord, SqlCaRepository, ca_metadata
from tether.storage.sql.migrate import alembic_config


def _diff(connection: Connection) -> list[object]:
    """Differences between the migrated database and `ca_metadata` that concern our table (the other
    tables are the storage module's and are checked by its tests)."""
    ctx = MigrationContext.configure(connection, opts={"compare_type": False})
    return [d for d in compare_metadata(ctx, ca_metadata) if "certificate_authorities" in repr(d)]


def test_migration_0002_follows_0001() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    revision = script.get_revision("0002_certificate_authorities")
    assert revision is not None and revision.down_revision == "0001_initial"
    assert "0002_certificate_authorities" in {r.revision for r in script.walk_revisions()}


async def test_migrated_table_matches_definition(storage: SqlStorage) -> None:
    async with storage.db.read() as conn:
        assert await conn.run_sync(_diff) == []


def _record(name: str, thumbprint: str, code: str | None = "CODE1") -> CaRecord:
    now = datetime.now(UTC).replace(microsecond=0)
    return CaRecord(name, "PEM", thumbprint, False, code, None, now, now)


async def test_repository_roundtrip(storage: SqlStorage) -> None:
    repo = SqlCaRepository(storage.db.engine)
    record = _record("fleet", "A" * 40)
    await repo.insert(record)
    assert await repo.get("fleet") == record
    assert await repo.get("Fleet") is None  # names are case-sensitive on both backends
    with pytest.raises(Conflict):
        await repo.insert(_record("fleet", "B" * 40))
    with pytest.raises(Conflict):
        await repo.insert(_record("other", "A" * 40))

    later = record.updated + timedelta(seconds=5)
    assert not await repo.update(replace(record, verified=True, updated=later), expected_code="WRONG")
    assert await repo.update(
        replace(record, verified=True, verification_code=None, updated=later), expected_code="CODE1"
    )
    stored = await repo.get("fleet")
    assert stored is not None and stored.verified and stored.verification_code is None
    assert stored.updated == later and stored.created == record.created

    await repo.insert(_record("another", "C" * 40))
    assert [r.name for r in await repo.list()] == ["another", "fleet"]
    assert await repo.delete("fleet")
    assert not await repo.delete("fleet")


async def test_ca_service_on_both_backends(storage: SqlStorage) -> None:
    service = CaService(SqlCaRepository(storage.db.engine))
    root, root_key = pki.issue_root_ca("Fleet")
    record = await service.add("fleet", root.public_bytes(serialization.Encoding.PEM))
    assert record.verification_code is not None
    proof, _ = pki.issue_verification_cert(record.verification_code, root, root_key)
    await service.verify("fleet", proof.public_bytes(serialization.Encoding.PEM))
    assert await service.verified_certificates() == [root]
