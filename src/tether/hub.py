"""Composition root: builds every service from `Settings` and starts/stops the listeners.

Protocol surfaces receive the `Hub` and use only its public service attributes; nothing else wires
modules together. Embedded defaults: SQLite + local segment files under `settings.data_dir`; with
`cluster.nats_url` set, a `ClusterBus` connects this process to the other hub nodes (`hub.cluster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from tether.cluster.bus import ClusterBus
from tether.cluster.node import resolve_node_id
from tether.config import Settings
from tether.messaging.c2d import C2DService
from tether.messaging.c2d_delivery import C2DPumps
from tether.messaging.configurations import ConfigurationReconciler, ConfigurationService
from tether.messaging.device_sessions import DeviceSessions
from tether.messaging.events import EventStream, open_stream
from tether.messaging.file_upload import FileUploadService
from tether.messaging.jobs import JobRunner, JobService
from tether.messaging.lease import Leadership
from tether.messaging.methods import MethodService
from tether.messaging.presence import ConnectionRegistry
from tether.messaging.query.scope import validate_scope
from tether.messaging.telemetry import TelemetryPipeline
from tether.messaging.twins import TwinService
from tether.registry.models import utcnow
from tether.registry.modules import ModuleService
from tether.registry.service import RegistryService
from tether.security.admission import ConnectionSlots, socket_capacity
from tether.security.audit import AuditLog
from tether.security.audit_retention import AuditRetention
from tether.security.authenticator import Authenticator
from tether.security.identity import OperatorIdentity
from tether.security.oidc import OidcProvider
from tether.security.operators import LOCAL_ISSUER, OperatorService
from tether.security.policies import PolicyService
from tether.security.role_assignments import RoleService
from tether.security.sessions import SessionService
from tether.security.x509 import CaService, X509Verifier
from tether.storage.factory import open_storage
from tether.storage.sql.configurations import SqlConfigurationRepository
from tether.storage.sql.file_uploads import SqlFileUploadRepository
from tether.storage.sql.jobs import SqlJobRepository, SqlLeaseRepository
from tether.storage.sql.operators import SqlOperatorRepository
from tether.storage.sql.storage import SqlStorage
from tether.storage.sql.twins import SqlTwinRepository

log = logging.getLogger("tether.hub")

ACTIVITY_FLUSH_INTERVAL_S = 5.0
THROTTLE_SWEEP_INTERVAL_S = 1.0
FILE_UPLOAD_SWEEP_INTERVAL_S = 5.0
SESSION_SWEEP_INTERVAL_S = 300.0
RETENTION_FIRST_S = 60.0  # the first audit retention run after start (a hub restarted often still runs it)


class Hub:
    """Owns storage, services and listeners for one gateway process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage: SqlStorage = open_storage(settings)
        self.audit = AuditLog(self.storage.audit)
        retention = settings.audit
        self.audit_retention = AuditRetention(
            self.storage.audit, self.audit, settings.audit_export_dir,
            max_age_s=retention.retention_days * 86400 if retention.retention_days else None,
            max_records=retention.max_records or None,
        )
        self.policies = PolicyService(self.storage.policies, self.audit)
        self.registry = RegistryService(self.storage.devices, self.audit)
        self.modules = ModuleService(self.storage.modules, self.registry, self.audit)
        self.stream: EventStream = open_stream(
            settings.stream_url,
            partitions=settings.storage.stream_partitions,
            retention_hours=settings.storage.stream_retention_hours,
            retention_bytes=settings.storage.stream_retention_bytes,
        )
        self.twins = TwinService(SqlTwinRepository(self.storage.db), self.registry, self.audit,
                                 modules=self.modules)
        self.telemetry = TelemetryPipeline(self.stream, settings.limits)
        self.c2d = C2DService(
            self.storage.db, audit=self.audit, max_queue_depth=settings.c2d.max_queue_depth,
            max_delivery_count=settings.c2d.max_delivery_count, lock_timeout_s=settings.c2d.lock_timeout_s,
            default_ttl_s=settings.c2d.default_ttl_s,
        )
        self.connections = ConnectionRegistry(settings.limits.max_connections)
        # Every listener's sockets: descriptor budget, per-peer caps, shedding (re-measured at start).
        self.slots = ConnectionSlots(socket_capacity(settings.limits.fd_reserve),
                                     settings.limits.max_connections_per_peer)
        self.registry.add_status_listener(self.connections.status_listener())
        self.modules.add_listener(self.connections.module_deleted)
        self.methods = MethodService(self.connections, registry=self.registry, audit=self.audit,
                                     modules=self.modules)
        self.registry.add_status_listener(self.methods.status_listener())
        self.c2d_pumps = C2DPumps(self.c2d)
        self.device_sessions = DeviceSessions(
            connections=self.connections, twins=self.twins, methods=self.methods, c2d_pumps=self.c2d_pumps,
            registry=self.registry, modules=self.modules,
        )
        self.node_id = resolve_node_id(settings.cluster.node_id)
        self.cluster: ClusterBus | None = None
        if settings.cluster.nats_url is not None:
            self.cluster = ClusterBus(settings.cluster, node_id=self.node_id)
            self.cluster.attach(registry=self.registry, policies=self.policies, connections=self.connections,
                                c2d=self.c2d,
                                twins=self.twins, methods=self.methods, sessions=self.device_sessions,
                                modules=self.modules)
            if settings.storage.database_url is None or settings.stream_url.startswith("file:"):
                log.warning("cluster.nats_url is set but storage is embedded (SQLite / file stream): "
                            "hub nodes only share state through storage.database_url = postgresql+"
                            "asyncpg://… and storage.stream_url = nats://…")
        self.file_uploads = FileUploadService(SqlFileUploadRepository(self.storage.db), settings.file_upload,
                                              self.audit, ca_file=settings.blob.ca_file)
        jobs_repo = SqlJobRepository(self.storage.db)
        self.leases = SqlLeaseRepository(self.storage.db)
        self.jobs = JobService(jobs_repo, self.audit)
        self.job_runner = JobRunner(
            jobs_repo, Leadership(self.leases, "jobs", self.node_id, ttl_s=settings.jobs.lease_ttl_s),
            twins=self.twins, methods=self.methods, registry=self.registry, modules=self.modules,
            audit=self.audit, concurrency=settings.jobs.concurrency,
            poll_interval_s=settings.jobs.poll_interval_s, retention_s=settings.jobs.retention_days * 86400,
            blob_ca_file=settings.blob.ca_file)
        self.jobs.on_created(self.job_runner.wake)
        self.configurations = ConfigurationService(SqlConfigurationRepository(self.storage.db), self.twins,
                                                   self.audit)
        self.configuration_reconciler = ConfigurationReconciler(
            self.configurations, self.twins, self.job_runner.leadership,
            sweep_interval_s=settings.jobs.configuration_sweep_s)
        self.cas = CaService(self.storage.cas, self.audit)
        self.cert_verifier = X509Verifier(self.cas)
        # People: OIDC providers, local operators, console sessions, role assignments.
        ops = settings.operators
        operator_store = SqlOperatorRepository(self.storage.db)
        self.roles = RoleService(operator_store, self.audit, validate_scope=validate_scope)
        self.sessions = SessionService(operator_store, ttl_s=ops.session_ttl_s)
        self.operators = OperatorService(
            operator_store, self.audit, lockout_threshold=ops.lockout_threshold, lockout_s=ops.lockout_s,
            on_revoke=lambda username: self.sessions.end_all(LOCAL_ISSUER, username))
        self.identity = OperatorIdentity([OidcProvider(p) for p in ops.oidc], self.operators, self.sessions,
                                         self.roles)
        self.authenticator = Authenticator(
            hostname=settings.hub.hostname,
            devices=self.registry,
            policies=self.policies,
            audit=self.audit,
            clock_skew_s=settings.limits.sas_clock_skew_s,
            max_token_lifetime_s=settings.limits.sas_max_lifetime_s,
            cert_verifier=self.cert_verifier,
            modules=self.modules,
            operators=self.identity,
            failure_rate=settings.limits.auth_failures_per_second,
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Any] = []
        self.ports: dict[str, int] = {}
        self.tls: Any = None  # TlsContextFactory once listeners start

    async def open(self) -> None:
        """Connect storage (running migrations), the stream, and create default policies."""
        await self.storage.start()
        await self.stream.start()
        await self.c2d.start()
        await self.policies.ensure_defaults()
        if self.cluster is not None:
            await self.cluster.start()
        else:  # one gateway, just started: it holds no connection, whatever a crash left behind
            await self.storage.devices.reset_connection_states(utcnow())
        self._tasks.append(asyncio.create_task(
            _every(ACTIVITY_FLUSH_INTERVAL_S, self.registry.flush_activity, "activity flush")))
        self._tasks.append(asyncio.create_task(
            _every(THROTTLE_SWEEP_INTERVAL_S, self._audit_refusals, "aggregated refusal audit")))
        await self.file_uploads.start()
        self.job_runner.start()
        self.configuration_reconciler.start()
        self._tasks.append(asyncio.create_task(
            _every(FILE_UPLOAD_SWEEP_INTERVAL_S, self.file_uploads.sweep, "file upload sweep")))
        self._tasks.append(asyncio.create_task(
            _every(SESSION_SWEEP_INTERVAL_S, self.sessions.sweep, "expired-session sweep")))
        interval = self.settings.audit.retention_interval_s
        self._tasks.append(asyncio.create_task(_every(
            interval, self.audit_retention.run, "audit retention", first_s=min(interval, RETENTION_FIRST_S))))

    async def _audit_refusals(self) -> None:
        """Every second: the aggregated records of throttled peers that went quiet, and of sockets the
        listeners refused or shed (one record per reason, naming the peers with the most)."""
        await self.authenticator.audit_throttled()
        for report in self.slots.take_report():
            await self.audit.record("connection.refused", "refused", reason=report.reason,
                                    details={"count": report.count, "peers": dict(report.peers)})

    def add_server(self, name: str, server: asyncio.AbstractServer, closer: Any = None) -> None:
        """Track a listener so `close()` stops it; records its bound port in `ports`."""
        self._servers.append(server)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.ports[name] = int(sockets[0].getsockname()[1])
        if closer is not None:
            self._closers.append(closer)

    def reload_tls(self) -> None:
        """Hot-reload the server certificate/chain: new connections get it, live ones keep theirs."""
        if self.tls is not None:
            self.tls.reload()
            log.info("TLS certificate reloaded")

    async def service_connection_string(self, policy: str = "iothubowner") -> str:
        record = await self.policies.get(policy)
        return (
            f"HostName={self.settings.hub.hostname};SharedAccessKeyName={record.name};"
            f"SharedAccessKey={record.primary_key}"
        )

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        with contextlib.suppress(Exception):  # before connections close: unfinished devices resume later
            await self.job_runner.close()
        with contextlib.suppress(Exception):
            await self.configuration_reconciler.close()
        with contextlib.suppress(Exception):
            await self.connections.close_all("hub-stopping")
        with contextlib.suppress(Exception):  # stop C2D delivery, fail pending method calls
            await asyncio.gather(self.c2d_pumps.close(), self.methods.close(), return_exceptions=True)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                await self.cluster.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                await closer()
        with contextlib.suppress(Exception):
            await self.registry.flush_activity()
        with contextlib.suppress(Exception):
            await self.c2d.close()
        with contextlib.suppress(Exception):
            await self.file_uploads.close()
        await self.stream.close()
        await self.audit.close()
        await self.storage.close()

    async def __aenter__(self) -> Hub:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _every(interval_s: float, work: Callable[[], Awaitable[object]], what: str, *,
                 first_s: float | None = None) -> None:
    """Run `work` every `interval_s` (the first time after `first_s`, default the interval) until
    cancelled; a failure (a transient database or audit error) is logged and the next round runs."""
    delay = interval_s if first_s is None else first_s
    while True:
        await asyncio.sleep(delay)
        delay = interval_s
        try:
            await work()
        except Exception:
            log.exception("%s failed", what)
