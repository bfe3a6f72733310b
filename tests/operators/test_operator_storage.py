"""Migration 0006 creates exactly the operator tables the repository declares, on SQLite and
PostgreSQL; role assignments round-trip."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from tether.registry.models import utcnow
from tether.storage.sql import SqlStorage
from tether.storage.sql.operators import SqlOperatorRepository, operator_metadata


def _diff(connection: Connection) -> list[object]:
    def mine(name: str | None, type_: str, _parents: object) -> bool:
        return type_ != "table" or name in operator_metadata.tables

    ctx = MigrationContext.configure(connection, opts={"compare_type": False, "include_name": mine})
    return list(compare_metadata(ctx, operator_metadata))


async def test_migrated_operator_tables_match_their_definitions(storage: SqlStorage) -> None:
    async with storage.db.read() as conn:
        assert await conn.run_sync(_diff) == []


async def test_role_assignments_round_trip(storage: SqlStorage) -> None:
    repo = SqlOperatorRepository(storage.db)
    a = await repo.insert_assignment("local", "alice", "DataReader", "tags.site = 'a'", utcnow(), "t")
    b = await repo.insert_assignment("https://idp/", "alice", "Owner", None, utcnow(), None)
    assert [r.id for r in await repo.list_assignments("local", "alice")] == [a.id]
    assert {r.role for r in await repo.list_assignments(subject="alice")} == {"DataReader", "Owner"}
    assert (await repo.delete_assignment(b.id)) == b
    assert await repo.delete_assignment(b.id) is None
