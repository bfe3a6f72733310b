"""SQL storage (SQLAlchemy 2 async, Alembic migrations) for SQLite and PostgreSQL."""

from tether.storage.sql.storage import SqlStorage

__all__ = ["SqlStorage"]
