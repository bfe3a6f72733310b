"""Schema management: Alembic migrations shipped in the package, run at start, idempotent, matching the
table definitions; SQLite opened durable (WAL + synchronous=FULL) and owner-only."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from tether.config import Settings
from tether.registry.models import Device
from tether.storage.factory import open_storage
from tether.storage.sql import SqlStorage
from tether.storage.sql.migrate import MIGRATIONS_DIR, alembic_config, current_revision, head_revision
from tether.storage.sql.tables import Base


def test_migrations_live_in_the_package_and_start_at_0001() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_revision("0001_initial").down_revision is None
    assert len(script.get_heads()) == 1  # a linear history
    assert head_revision() == script.get_current_head()


async def test_start_migrates_to_head_and_is_idempotent(storage: SqlStorage, db_url: str) -> None:
    assert await current_revision(storage.db) == head_revision()
    await storage.devices.insert(Device(deviceId="kept", etag="e"))
    await storage.start()  # second upgrade on the same storage: nothing to do
    again = SqlStorage(db_url)
    await again.start()  # and from a new process-like instance
    try:
        assert await current_revision(again.db) == head_revision()
        assert await again.devices.get("kept") is not None
    finally:
        await again.close()


async def test_concurrent_starts_on_one_database(db_url: str) -> None:
    stores = [SqlStorage(db_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        for s in stores:
            assert await current_revision(s.db) == head_revision()
    finally:
        for s in stores:
            await s.close()


def _diff(connection: Connection) -> list[object]:
    def mine(name: str | None, type_: str, _parents: object) -> bool:
        # Tables of other modules (certificate_authorities, twins, c2d…) are checked by their owners.
        return type_ != "table" or name in Base.metadata.tables

    ctx = MigrationContext.configure(connection, opts={"compare_type": False, "include_name": mine})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrated_schema_matches_table_definitions(storage: SqlStorage) -> None:
    async with storage.db.read() as conn:
        diff = await conn.run_sync(_diff)
    assert diff == []


async def test_sqlite_is_durable_wal_and_owner_only(sqlite_url: str) -> None:
    store = SqlStorage(sqlite_url)
    await store.start()
    try:
        async with store.db.read() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
            sync = (await conn.execute(text("PRAGMA synchronous"))).scalar()
            fks = (await conn.execute(text("PRAGMA foreign_keys"))).scalar()
            busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar()
        assert (mode, sync, fks) == ("wal", 2, 1)  # synchronous 2 == FULL
        assert busy is not None and int(busy) >= 1000
    finally:
        await store.close()
    db_file = Path(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    assert stat.S_IMODE(db_file.stat().st_mode) == 0o600


async def test_open_storage_creates_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    settings = Settings(hub={"data_dir": data_dir})  # type: ignore[arg-type]
    store = open_storage(settings)
    assert data_dir.is_dir()
    await store.start()
    try:
        assert (data_dir / "tether.db").is_file()
        assert await current_revision(store.db) == head_revision()
    finally:
        await store.close()


async def test_open_storage_uses_the_configured_url(pg_url: str) -> None:
    settings = Settings(storage={"database_url": pg_url})  # type: ignore[arg-type]
    store = open_storage(settings)
    assert store.db.is_postgres
    await store.start()
    await store.close()
