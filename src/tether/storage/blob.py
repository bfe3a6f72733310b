"""Azure Blob Storage, as the hub uses it: SAS tokens for one blob or one container, and an async client
for the few blob operations the hub performs itself (the Azure Blob REST API through Microsoft's
`azure-storage-blob`, aio flavour; see docs/decisions/0012-blob-storage.md).

Any Azure Storage-compatible account works: Azure itself (`https://{account}.blob.core.windows.net`)
or Azurite (path-style `https://{ip}[:port]/{account}`), which the tests and `tether dev azurite`
run on a loopback address with a certificate from the hub's dev PKI.

- `BlobAccount` is the account the hub owns (name, key, endpoint): `blob_sas` signs a service SAS for
  exactly one blob (`sr=b`) with the permissions asked for (file upload: create + write, never
  read, list or delete) and an expiry; `host_name` is what a device joins as
  `https://{hostName}/{container}/{blob}{sasToken}` (Azure's file-upload answer carries no scheme).
- `BlobStore` is the hub's own client on that account (shared key): container creation, a blob's
  properties (file upload notifications report its size), upload and download.
- `ContainerUri` is a container SAS URI a caller hands in (import/export jobs' `inputBlobContainerUri`
  / `outputBlobContainerUri`): the hub reads and writes blobs there with the caller's SAS only. Its
  text is a secret (it carries a signature): never log it, show `redacted()`.

The SDK (≈0.5 s to import) is imported on first use, so a hub without blob storage never loads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from tether.errors import BadRequest, TetherError

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient, ContainerClient

__all__ = [
    "BlobAccount",
    "BlobError",
    "BlobInfo",
    "BlobStore",
    "ContainerUri",
    "StorageUnavailable",
]

AZURE_SUFFIX: Final = ".blob.core.windows.net"
MAX_SAS_TTL_S: Final = 48 * 3600
CLOCK_SKEW_S: Final = 300  # a SAS starts this long ago, so a storage clock slightly behind accepts it


class BlobError(TetherError):
    """The storage refused or failed an operation; `code` is the storage's error code when it sent
    one (e.g. `ContainerNotFound`, `AuthenticationFailed`)."""

    http_status = 502
    default_code = "StorageError"


class StorageUnavailable(TetherError):
    """Blob storage is not configured or not reachable."""

    http_status = 503
    default_code = "ServiceUnavailable"


@dataclass(frozen=True, slots=True)
class BlobInfo:
    name: str
    size: int
    last_modified: datetime
    etag: str


def _endpoint(account_name: str, endpoint: str | None) -> str:
    url = (endpoint or f"https://{account_name}{AZURE_SUFFIX}").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("blob endpoint must be an http(s) URL without query or fragment, e.g. "
                         "https://myaccount.blob.core.windows.net or https://127.0.0.1:10000/myaccount")
    return url


@dataclass(frozen=True, slots=True)
class BlobAccount:
    """A storage account: `endpoint` is the blob service URL (default Azure's
    `https://{name}.blob.core.windows.net`); `ca_file` a PEM bundle to trust for it (default: system)."""

    name: str
    key: str
    endpoint: str
    ca_file: Path | None = None

    @classmethod
    def create(cls, name: str, key: str, endpoint: str | None = None,
               ca_file: Path | None = None) -> BlobAccount:
        return cls(name, key, _endpoint(name, endpoint), ca_file)

    def __repr__(self) -> str:  # never print the key
        return f"BlobAccount(name={self.name!r}, endpoint={self.endpoint!r})"

    @property
    def host_name(self) -> str:
        """The endpoint without its scheme: Azure's file-upload `hostName` (may carry port and path)."""
        parts = urlsplit(self.endpoint)
        return parts.netloc + parts.path

    def blob_url(self, container: str, blob: str, sas: str | None = None) -> str:
        url = f"{self.endpoint}/{container}/{quote(blob, safe='/')}"
        return f"{url}?{sas}" if sas else url

    def container_url(self, container: str, sas: str | None = None) -> str:
        url = f"{self.endpoint}/{container}"
        return f"{url}?{sas}" if sas else url

    def blob_sas(self, container: str, blob: str, *, ttl_s: float, read: bool = False, create: bool = False,
                 write: bool = False, delete: bool = False, now: datetime | None = None) -> str:
        """A service SAS for this one blob (`sr=b`), valid `ttl_s` seconds; without a leading `?`."""
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        start, expiry = _window(ttl_s, now)
        return generate_blob_sas(
            account_name=self.name, container_name=container, blob_name=blob, account_key=self.key,
            permission=BlobSasPermissions(read=read, create=create, write=write, delete=delete),
            start=start, expiry=expiry, protocol="https" if self.endpoint.startswith("https") else None,
        )

    def container_sas(self, container: str, *, ttl_s: float, read: bool = False, write: bool = False,
                      create: bool = False, list_: bool = False, delete: bool = False,
                      now: datetime | None = None) -> str:
        """A service SAS for a whole container (`sr=c`), e.g. for an import/export job."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        start, expiry = _window(ttl_s, now)
        return generate_container_sas(
            account_name=self.name, container_name=container, account_key=self.key,
            permission=ContainerSasPermissions(read=read, write=write, create=create, list=list_,
                                               delete=delete),
            start=start, expiry=expiry,
        )


def _window(ttl_s: float, now: datetime | None) -> tuple[datetime, datetime]:
    if not 0 < ttl_s <= MAX_SAS_TTL_S:
        raise ValueError(f"SAS lifetime must be between 0 and {MAX_SAS_TTL_S} seconds")
    now = now or datetime.now(UTC)
    return now - timedelta(seconds=CLOCK_SKEW_S), now + timedelta(seconds=ttl_s)


def _client_options(ca_file: Path | None) -> dict[str, Any]:
    options: dict[str, Any] = {"retry_total": 2, "connection_timeout": 10, "read_timeout": 60}
    if ca_file is not None:
        options["connection_verify"] = str(ca_file)
    return options


def _translate(exc: Exception, what: str) -> TetherError:
    """An SDK or network error as a `BlobError` naming the storage's error code, never a URL or SAS."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError

    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "error_code", None) or f"Http{exc.status_code}"
        return BlobError(f"{what}: storage answered {exc.status_code} {code}", code=str(code))
    if isinstance(exc, ServiceRequestError | OSError):
        return StorageUnavailable(f"{what}: storage unreachable ({type(exc).__name__})")
    return BlobError(f"{what}: {type(exc).__name__}")


@contextlib.asynccontextmanager
async def _storage_call(what: str) -> AsyncIterator[None]:
    from azure.core.exceptions import AzureError

    try:
        yield
    except (AzureError, OSError) as exc:
        raise _translate(exc, what) from None


class BlobStore:
    """The hub's own client on its account (shared-key auth). Open once, close at shutdown."""

    def __init__(self, account: BlobAccount) -> None:
        self.account = account
        self._service: BlobServiceClient | None = None

    async def open(self) -> None:
        from azure.storage.blob.aio import BlobServiceClient

        if self._service is None:
            self._service = BlobServiceClient(
                self.account.endpoint, credential={"account_name": self.account.name,
                                                   "account_key": self.account.key},
                **_client_options(self.account.ca_file),
            )

    async def close(self) -> None:
        if self._service is not None:
            service, self._service = self._service, None
            await service.close()

    async def __aenter__(self) -> BlobStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _container(self, container: str) -> ContainerClient:
        if self._service is None:
            raise StorageUnavailable("blob storage client is not open")
        return self._service.get_container_client(container)

    async def ensure_container(self, container: str) -> bool:
        """Create the container when missing; True if it was created."""
        from azure.core.exceptions import ResourceExistsError

        async with _storage_call(f"create container {container}"):
            try:
                await self._container(container).create_container()
            except ResourceExistsError:
                return False
        return True

    async def properties(self, container: str, blob: str) -> BlobInfo | None:
        """Size and time of a blob, None when it does not exist."""
        return await _properties(self._container(container), blob)

    async def upload(self, container: str, blob: str, data: bytes | AsyncIterable[bytes]) -> None:
        await _upload(self._container(container), blob, data)

    async def download(self, container: str, blob: str) -> bytes:
        chunks = [chunk async for chunk in _download(self._container(container), blob)]
        return b"".join(chunks)


class ContainerUri:
    """A container SAS URI handed in by a caller; the hub acts on it with that SAS only."""

    def __init__(self, uri: str, *, ca_file: Path | None = None, field: str = "containerUri") -> None:
        parts = urlsplit(uri.strip()) if isinstance(uri, str) else None
        if (parts is None or parts.scheme not in ("https", "http") or not parts.netloc
                or not parts.path.strip("/")):
            raise BadRequest(f"{field} must be a blob container URL (https://…/container?sas)", field=field)
        self._uri = uri.strip()
        self._ca_file = ca_file
        self.field = field
        self.container_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    def redacted(self) -> str:
        """The URI without its SAS, for logs and answers."""
        return self.container_url

    def __repr__(self) -> str:
        return f"ContainerUri({self.redacted()!r})"

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[ContainerClient]:
        from azure.storage.blob.aio import ContainerClient

        client = ContainerClient.from_container_url(self._uri, **_client_options(self._ca_file))
        try:
            yield client
        finally:
            await client.close()

    async def properties(self, blob: str) -> BlobInfo | None:
        async with self._client() as client:
            return await _properties(client, blob)

    async def upload(self, blob: str, data: bytes | AsyncIterable[bytes]) -> None:
        async with self._client() as client:
            await _upload(client, blob, data)

    async def download(self, blob: str) -> AsyncIterator[bytes]:
        """The blob's bytes, chunk by chunk (BlobError `BlobNotFound` when it does not exist)."""
        async with self._client() as client:
            async for chunk in _download(client, blob):
                yield chunk


async def _properties(client: ContainerClient, blob: str) -> BlobInfo | None:
    from azure.core.exceptions import ResourceNotFoundError

    async with _storage_call(f"read properties of {blob}"):
        try:
            props = await client.get_blob_client(blob).get_blob_properties()
        except ResourceNotFoundError:
            return None
    modified = props.last_modified
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=UTC)
    return BlobInfo(blob, int(props.size), modified, str(props.etag))


async def _upload(client: ContainerClient, blob: str, data: bytes | AsyncIterable[bytes]) -> None:
    async with _storage_call(f"upload {blob}"):
        await client.get_blob_client(blob).upload_blob(data, overwrite=True, blob_type="BlockBlob")


async def _download(client: ContainerClient, blob: str) -> AsyncIterator[bytes]:
    async with _storage_call(f"download {blob}"):
        downloader = await client.get_blob_client(blob).download_blob()
        async for chunk in downloader.chunks():
            yield chunk
