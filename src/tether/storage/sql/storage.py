"""`SqlStorage`: the `tether.storage.base.Storage` implementation over SQLAlchemy (SQLite or PostgreSQL)."""

from __future__ import annotations

from tether.storage.base import AuditRepository, DeviceRepository, ModuleRepository, PolicyRepository
from tether.storage.sql.audit import SqlAuditRepository
from tether.storage.sql.cas import SqlCaRepository
from tether.storage.sql.devices import SqlDeviceRepository
from tether.storage.sql.engine import Database, prepare_sqlite_file, sqlite_path
from tether.storage.sql.migrate import upgrade
from tether.storage.sql.modules import SqlModuleRepository
from tether.storage.sql.policies import SqlPolicyRepository
from tether.storage.sql.twins import SqlTwinRepository


class SqlStorage:
    """All repositories over one database. `start()` connects and migrates to head; the same code runs
    on `sqlite+aiosqlite:///path` (embedded) and `postgresql+asyncpg://…` (scale-out)."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.db = Database(url, echo=echo)
        # Typed as the protocols so SqlStorage structurally satisfies `Storage` (mutable attributes).
        self.devices: DeviceRepository = SqlDeviceRepository(self.db)
        self.policies: PolicyRepository = SqlPolicyRepository(self.db)
        self.audit: AuditRepository = SqlAuditRepository(self.db)
        # Repositories of later migrations, for convenience (their owners also build them from `db`).
        self.cas = SqlCaRepository(self.db.engine)  # 0002_certificate_authorities
        self.twins = SqlTwinRepository(self.db)  # 0003_twins (module twins: 0007)
        self.modules: ModuleRepository = SqlModuleRepository(self.db)  # 0007

    @property
    def url(self) -> str:
        return self.db.url.render_as_string(hide_password=True)

    async def start(self) -> None:
        path = sqlite_path(self.db.url)
        if path is not None:
            prepare_sqlite_file(path)
        await upgrade(self.db)

    async def close(self) -> None:
        await self.db.dispose()
