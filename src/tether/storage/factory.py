"""Pick the storage backend from the settings: `database_url` (default SQLite in the data dir)."""

from __future__ import annotations

from tether.config import Settings
from tether.storage.sql import SqlStorage
from tether.storage.sql.engine import sqlite_path


def open_storage(settings: Settings) -> SqlStorage:
    """A not-yet-started `SqlStorage` for `settings.database_url`; for SQLite the data dir and the
    database's directory are created first (owner-only, as they hold keys). Call `start()` next."""
    url = settings.database_url
    path = sqlite_path(url)
    if path is not None:
        if settings.storage.database_url is None:
            settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqlStorage(url)


__all__ = ["open_storage"]
