"""The two backend sets the end-to-end tests run on, and the services they need.

- `embedded`: SQLite + the local segment-file stream under the node's data dir (the defaults);
- `scaleout`: a fresh PostgreSQL database + a JetStream stream, checkpoint bucket and cluster subjects /
  KV buckets named uniquely for the test, deleted afterwards.

PostgreSQL and NATS unreachable: the test skips on a developer machine, but FAILS when `CI=true`
(`.ci/run` starts both, so their absence there is a broken environment, not a reason to skip).
Also imported by `tests/cluster` (its conftest puts this directory on `sys.path`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest
from loop_helpers import run_sync
from sqlalchemy.engine import make_url

PG_SERVER_URL = os.environ.get("TETHER_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("TETHER_TEST_NATS_URL", "nats://127.0.0.1:4222")
PARTITIONS = 4
T = TypeVar("T")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unreachable(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return repr(exc)
    return None


def require(service: str, url: str, default_port: int) -> None:
    """Skip (developer machine) or fail (CI=true) when nothing listens behind `url`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    why = _unreachable(host, port)
    if why is None:
        return
    message = f"{service} unreachable at {host}:{port} ({why})"
    if in_ci():
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip: start {service} "
                    "(.ci/run starts PostgreSQL and NATS when they are down)", pytrace=False)
    pytest.skip(message)


def require_postgres() -> None:
    require("PostgreSQL", make_url(PG_SERVER_URL).set(drivername="postgresql").render_as_string(), 5432)


def require_nats() -> None:
    require("NATS", NATS_URL, 4222)


def _dsn(database: str | None = None) -> str:
    url = make_url(PG_SERVER_URL).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(_dsn(), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy asyncpg URL), dropped afterwards."""
    require_postgres()
    name = f"tether_{secrets.token_hex(6)}"
    run_sync(lambda: _pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_SERVER_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        run_sync(lambda: _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class NatsNames:
    """Unique JetStream / cluster names for one test, and their cleanup."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def stream(self) -> str:
        return f"TT_{self.suffix.upper()}"

    @property
    def checkpoint_bucket(self) -> str:
        return f"tt_cp_{self.suffix}"

    @property
    def prefix(self) -> str:
        return f"tt_{self.suffix}"

    @property
    def stream_url(self) -> str:
        return f"{NATS_URL}?stream={self.stream}&bucket={self.checkpoint_bucket}"

    def cleanup(self) -> None:
        """Delete the partition streams and every KV bucket the test's hubs created."""

        async def run() -> None:
            import nats

            nc = await nats.connect(NATS_URL, connect_timeout=5)
            try:
                js = nc.jetstream(timeout=5)
                for p in range(PARTITIONS):
                    with contextlib.suppress(Exception):
                        await js.delete_stream(f"{self.stream}_P{p}")
                for bucket in (self.checkpoint_bucket, f"{self.prefix}_presence", f"{self.prefix}_sessions"):
                    with contextlib.suppress(Exception):
                        await js.delete_key_value(bucket)
            finally:
                await nc.close()

        with contextlib.suppress(Exception):
            run_sync(run)


@dataclass
class BackendSet:
    """Settings overrides for one backend set (`storage` and `cluster` tables)."""

    name: str
    storage: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def scaleout_backends(*, cluster: bool = True) -> Iterator[tuple[BackendSet, NatsNames]]:
    """PostgreSQL (fresh database) + JetStream (unique names), and the cluster bus on the same NATS."""
    require_nats()
    names = NatsNames()
    with pg_database() as db_url:
        backend = BackendSet("scaleout", storage={"database_url": db_url, "stream_url": names.stream_url})
        if cluster:
            backend.cluster = {"nats_url": NATS_URL, "subject_prefix": names.prefix}
        try:
            yield backend, names
        finally:
            names.cleanup()
