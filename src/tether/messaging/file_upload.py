"""Device file upload, as Azure IoT Hub does it: the hub hands a device a short-lived SAS for one blob,
the device uploads straight to blob storage, then tells the hub it is done; the service hears about
finished uploads from the file upload notification queue.

Promises:
- the blob is always `{deviceId}/{blobName}` in the configured container, and the SAS is a service SAS
  for exactly that blob with create + write rights only (no read, list or delete), valid
  `file_upload.sas_ttl_s`: a device can neither write another device's blobs nor read anything;
- at most `file_upload.max_in_flight` uploads per device whose SAS is still valid (403 beyond);
- a completion names the correlation id the device got; only that device can complete it, once;
- a successful completion (with notifications on) reads the blob's size and time from storage and
  queues one notification (`deviceId, blobUri, blobName, lastUpdatedTime, blobSizeInBytes,
  enqueuedTimeUtc`), delivered at least once: locked batches, completed or abandoned by the service,
  offered again after the lock expires, until the TTL or delivery count runs out;
- every SAS handed out, refused or completed upload is audited (`file.sas`, `file.notify`).

`FileNotificationQueue` is the protocol-neutral service side of the queue: REST
(`GET /messages/serviceBound/filenotifications`) uses it, and the AMQP receiver
`/messages/serviceBound/filenotifications` can too (`receive(max_records=1)` per AMQP message).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tether.config import FileUploadSettings
from tether.errors import BadRequest, NotFound, PreconditionFailed, QuotaExceeded, TetherError
from tether.security.audit import AuditLog
from tether.storage.blob import BlobAccount, BlobStore
from tether.storage.sql.file_uploads import FileNotificationRecord, SqlFileUploadRepository

__all__ = [
    "MAX_BATCH",
    "FileNotificationBatch",
    "FileNotificationQueue",
    "FileUploadService",
    "StorageInfo",
    "notification_json",
]

log = logging.getLogger("tether.file_upload")

MAX_BATCH: Final = 64
MAX_WAIT_S: Final = 60.0
MAX_BLOB_NAME: Final = 1024
_RECHECK_S: Final = 1.0
_BAD_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True, slots=True)
class StorageInfo:
    """Azure's answer to `POST /devices/{id}/files`."""

    correlation_id: str
    host_name: str
    container_name: str
    blob_name: str
    sas_token: str  # starts with "?"

    def to_wire(self) -> dict[str, str]:
        return {"correlationId": self.correlation_id, "hostName": self.host_name,
                "containerName": self.container_name, "blobName": self.blob_name, "sasToken": self.sas_token}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def notification_json(record: FileNotificationRecord) -> dict[str, Any]:
    """One file upload notification, Azure's field names."""
    return {"deviceId": record.device_id, "blobUri": record.blob_uri, "blobName": record.blob_name,
            "lastUpdatedTime": _iso(record.last_updated_ms), "blobSizeInBytes": record.blob_size,
            "enqueuedTimeUtc": _iso(record.enqueued_ms)}


def check_blob_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("blobName must be a non-empty string", field="blobName")
    if len(name) > MAX_BLOB_NAME - 129 or "\\" in name or name.startswith("/") or _BAD_SEGMENT.search(name):
        raise BadRequest("blobName must be a relative path (no '.', '..' or empty leading segment, no '\\') "
                         f"of at most {MAX_BLOB_NAME - 129} characters", field="blobName")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest("blobName must not contain control characters", field="blobName")
    return name


@dataclass(frozen=True, slots=True)
class FileNotificationBatch:
    lock_token: str
    records: list[FileNotificationRecord]

    def to_wire(self) -> list[dict[str, Any]]:
        return [notification_json(r) for r in self.records]


class FileNotificationQueue:
    """The service side of the file upload notification queue (REST, and AMQP where it exists)."""

    def __init__(self, repo: SqlFileUploadRepository, settings: FileUploadSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._repo = repo
        self._settings = settings
        self._clock = clock
        self._changed = asyncio.Event()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def notify(self) -> None:
        """Wake long-polling receivers: a notification was queued."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def receive(self, *, timeout_s: float = 0.0,
                      max_records: int = MAX_BATCH) -> FileNotificationBatch | None:
        """Lock the next batch; with `timeout_s` > 0 wait up to that long (max 60 s) for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout_s, 0.0), MAX_WAIT_S)
        max_records = max(1, min(max_records, MAX_BATCH))
        while True:
            changed = self._changed
            found = await self._repo.lock(
                max_records=max_records, now_ms=self._now_ms(),
                lock_ms=int(self._settings.notification_lock_timeout_s * 1000),
                max_delivery_count=self._settings.notification_max_delivery_count)
            if found is not None:
                return FileNotificationBatch(*found)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, _RECHECK_S))
            except TimeoutError:
                pass

    async def complete(self, lock_token: str) -> None:
        """Delete the batch; 412 when its lock is unknown or expired."""
        if not await self._repo.settle(lock_token, complete=True, now_ms=self._now_ms()):
            raise _lock_lost()

    async def abandon(self, lock_token: str) -> None:
        """Offer the batch again at once; 412 when its lock is unknown or expired."""
        if not await self._repo.settle(lock_token, complete=False, now_ms=self._now_ms()):
            raise _lock_lost()
        self.notify()

    async def pending(self) -> int:
        return await self._repo.count()


def _lock_lost() -> PreconditionFailed:
    return PreconditionFailed("file notification lock token is unknown or its lock expired",
                              code="PreconditionFailed")


class FileUploadService:
    """SAS for device uploads, their completion, and the notification queue."""

    def __init__(self, repo: SqlFileUploadRepository, settings: FileUploadSettings, audit: AuditLog, *,
                 ca_file: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self._repo = repo
        self.settings = settings
        self._audit = audit
        self._clock = clock
        self.account: BlobAccount | None = None
        if settings.enabled:
            assert settings.account_name is not None and settings.account_key is not None
            self.account = BlobAccount.create(settings.account_name, settings.account_key,
                                              settings.blob_endpoint, ca_file)
        self._store: BlobStore | None = BlobStore(self.account) if self.account else None
        self._container_ready = False
        self.notifications = FileNotificationQueue(repo, settings, clock=clock)

    @property
    def enabled(self) -> bool:
        return self.account is not None

    async def start(self) -> None:
        if self._store is not None:
            await self._store.open()

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _require(self) -> tuple[BlobAccount, BlobStore]:
        if self.account is None or self._store is None:
            raise BadRequest("file upload is not configured on this hub (file_upload.account_name / "
                             "account_key)", code="FileUploadNotConfigured")
        return self.account, self._store

    async def _ensure_container(self, store: BlobStore) -> None:
        if not self._container_ready:
            await store.ensure_container(self.settings.container)
            self._container_ready = True

    async def create_sas(self, device_id: str, blob_name: object, *, actor: str) -> StorageInfo:
        """A SAS URI for `{device_id}/{blob_name}` (create + write), and the upload's correlation id."""
        try:
            account, store = self._require()
            name = check_blob_name(blob_name)
            await self._ensure_container(store)
            blob = f"{device_id}/{name}"
            correlation_id = uuid.uuid4().hex
            ttl_s = self.settings.sas_ttl_s
            now_ms = self._now_ms()
            if not await self._repo.begin(correlation_id=correlation_id, device_id=device_id, blob_name=blob,
                                          now_ms=now_ms, expiry_ms=now_ms + ttl_s * 1000,
                                          max_in_flight=self.settings.max_in_flight):
                raise QuotaExceeded(f"device {device_id} has {self.settings.max_in_flight} file uploads in "
                                    "flight; complete one first", code="IotHubQuotaExceeded")
            sas = account.blob_sas(self.settings.container, blob, ttl_s=ttl_s, create=True, write=True)
        except TetherError as exc:
            await self._audit.record("file.sas", "refused", principal=actor, target=device_id,
                                     reason=exc.code, details={"error": exc.message[:200]})
            raise
        await self._audit.record("file.sas", "ok", principal=actor, target=device_id,
                                 details={"blobName": blob, "correlationId": correlation_id, "ttl": ttl_s})
        return StorageInfo(correlation_id, account.host_name, self.settings.container, blob, f"?{sas}")

    async def complete(self, device_id: str, correlation_id: object, *, is_success: bool,
                       status_code: object = None, status_description: object = None, actor: str) -> None:
        """The device finished (or gave up on) an upload; queue the notification if it succeeded."""
        if not isinstance(correlation_id, str) or not correlation_id or len(correlation_id) > 64:
            raise BadRequest("correlationId is required", field="correlationId")
        blob = await self._repo.finish(correlation_id=correlation_id, device_id=device_id)
        details: dict[str, Any] = {"correlationId": correlation_id, "isSuccess": is_success,
                                   "statusCode": status_code if isinstance(status_code, int) else None}
        if blob is None:
            await self._audit.record("file.notify", "refused", principal=actor, target=device_id,
                                     reason="unknown-correlation-id", details=details)
            raise NotFound(f"no file upload {correlation_id} of device {device_id} is in flight",
                           code="FileUploadNotFound", field="correlationId")
        details["blobName"] = blob
        if is_success and self.settings.notifications and self.account is not None and self._store:
            info = await self._store.properties(self.settings.container, blob)
            if info is None:
                await self._audit.record("file.notify", "failed", principal=actor, target=device_id,
                                         reason="blob-not-found", details=details)
                raise BadRequest(f"blob {blob} does not exist in storage", code="BlobNotFound",
                                 field="correlationId")
            now_ms = self._now_ms()
            await self._repo.enqueue(
                device_id=device_id, blob_name=blob,
                blob_uri=self.account.blob_url(self.settings.container, blob), blob_size=info.size,
                last_updated_ms=int(info.last_modified.timestamp() * 1000), now_ms=now_ms,
                ttl_ms=int(self.settings.notification_ttl_s * 1000))
            self.notifications.notify()
            details["size"] = info.size
        await self._audit.record("file.notify", "ok", principal=actor, target=device_id, details=details)

    async def sweep(self) -> None:
        """Drop expired uploads and notifications (run every few seconds by the hub)."""
        await self._repo.sweep(now_ms=self._now_ms(),
                               max_delivery_count=self.settings.notification_max_delivery_count)

    def describe(self) -> dict[str, Any]:
        """The settings a user may see (never the key)."""
        s = self.settings
        return {"enabled": self.enabled, "accountName": s.account_name,
                "endpoint": self.account.endpoint if self.account else None, "container": s.container,
                "sasTtlSeconds": s.sas_ttl_s, "notifications": s.notifications,
                "notificationTtlSeconds": s.notification_ttl_s,
                "notificationMaxDeliveryCount": s.notification_max_delivery_count,
                "maxInFlightPerDevice": s.max_in_flight}

