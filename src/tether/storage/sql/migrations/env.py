"""Alembic environment for Tether's schema.

Normally run in-process by `tether.storage.sql.migrate.upgrade()`, which hands over an open connection
(inside a transaction) via `config.attributes["connection"]`. When run from the `alembic` command line
instead, the URL comes from `-x url=…` or the `sqlalchemy.url` option, e.g.
`alembic -c /dev/null -x url=sqlite+aiosqlite:///tether-data/tether.db upgrade head` with
`script_location` set to this directory.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from tether.storage.sql.c2d import c2d_metadata
from tether.storage.sql.cas import ca_metadata
from tether.storage.sql.fleet_tables import fleet_metadata
from tether.storage.sql.modules import module_metadata
from tether.storage.sql.operators import operator_metadata
from tether.storage.sql.tables import Base
from tether.storage.sql.twins import twin_metadata

config = context.config
# Every MetaData whose tables the migrations create (for `alembic revision --autogenerate`).
target_metadata = [
    Base.metadata, ca_metadata, twin_metadata, c2d_metadata, operator_metadata, module_metadata,
    fleet_metadata,
]


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER TABLE needs batch mode
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(url: str) -> None:
    from tether.storage.sql.engine import Database

    db = Database(url)
    try:
        async with db.write() as conn:
            await conn.run_sync(_run)
    finally:
        await db.dispose()


def _main() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass -x url=… or set sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_standalone(url))


_main()
