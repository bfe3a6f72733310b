"""One async engine per storage, configured so the same SQL behaves the same on SQLite and PostgreSQL.

SQLite durability and locking (the embedded deployment):
- `journal_mode=WAL` lets readers run while one writer commits.
- `synchronous=FULL`: in WAL mode every commit fsyncs the WAL before `COMMIT` returns, so a write the hub
  has acknowledged survives power loss. `NORMAL` would only survive an application crash (the last
  commits can roll back on power loss), which breaks the "acknowledged means durable" promise; the hot
  paths (audit, device activity) batch their writes, so the extra fsync per commit is affordable.
- `busy_timeout` makes a second writer (another connection or process) wait for the lock instead of
  failing at once with `database is locked`.
- `foreign_keys=ON` because SQLite ignores foreign keys otherwise (later tables reference devices).
- pysqlite's implicit transaction handling is switched off and we emit `BEGIN` ourselves (SQLAlchemy's
  documented recipe): DDL then runs inside the transaction (migrations are atomic) and write
  transactions start with `BEGIN IMMEDIATE`, taking the write lock up front. A deferred transaction that
  reads and then writes can fail with SQLITE_BUSY without waiting, which `busy_timeout` cannot fix.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 15_000
_WRITE_OPTION = "tether_write"


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL, or None for PostgreSQL and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def prepare_sqlite_file(path: Path) -> None:
    """Create the database file owner-only (0600) before SQLite does: it holds device and policy keys,
    and SQLite gives its -wal/-shm files the permissions of the main file."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


class Database:
    """An async engine plus `read()`/`write()` transactions; repositories share one instance."""

    def __init__(self, url: str | URL, *, echo: bool = False) -> None:
        self.url = make_url(url)
        self.dialect_name = self.url.get_backend_name()
        if self.dialect_name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.dialect_name!r}: use sqlite or postgresql")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect_name == "postgresql":
            kwargs["pool_pre_ping"] = True
        self.engine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            _install_sqlite_hooks(self.engine)
        self._writer = self.engine.execution_options(**{_WRITE_OPTION: True})
        # SQLite admits one writer at a time; queueing writers of this process on an asyncio lock is
        # fair and immediate, where SQLite's busy handler sleeps and retries (the C2D tail latency).
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect_name == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect_name == "postgresql"

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction (a consistent snapshot on both backends)."""
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: commits on success, rolls back on any exception."""
        if self._write_lock is None:
            async with self._writer.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._writer.begin() as conn:
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()
