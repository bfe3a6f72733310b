"""Run the packaged Alembic migrations to head from inside the process (no alembic.ini, no CLI).

The migration scripts are located relative to this file, so this works the same from a source tree and
from an installed wheel (pyproject ships `migrations/*.py` and `migrations/versions/*.py` as package
data). All pending migrations run in one transaction; on PostgreSQL an advisory lock serialises hub
nodes that start at the same time, on SQLite `BEGIN IMMEDIATE` does.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from tether.storage.sql.engine import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x7E7E_0001  # arbitrary, constant advisory-lock key


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    # ConfigParser interpolation: a literal '%' in the path must be doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(db: Database) -> None:
    """Bring the schema to the newest revision; a no-op when it is already there."""
    async with db.write() as conn:
        if db.is_postgres:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        await conn.run_sync(_upgrade)


async def current_revision(db: Database) -> str | None:
    async with db.read() as conn:
        return await conn.run_sync(_current)
