"""Blob storage for the conformance suite: containers and blobs in the hub's Azurite (through the hub's
own `BlobStore`, on the hub's loop), a device's upload with the SAS the hub gave it, the service's file
upload notification queue (Tether's REST form), and a storage endpoint that stalls (127.0.0.86)."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from azurite_helpers import server_cert
from conformance_kit import API, STALL_IP, AzureHub

from tether.storage.blob import BlobStore


def container_sas_uri(hub: AzureHub, container: str) -> str:
    """A fresh container in the hub's Azurite and a read/write/create/list SAS URI for it."""
    assert hub.azurite is not None
    account = hub.azurite.account

    async def ensure() -> None:
        async with BlobStore(account) as store:
            await store.ensure_container(container)

    hub.node.call(ensure(), timeout=60)
    sas = account.container_sas(container, ttl_s=3600, read=True, write=True, create=True, list_=True)
    return account.container_url(container, sas)


def blob_bytes(hub: AzureHub, container: str, blob: str) -> bytes:
    assert hub.azurite is not None
    account = hub.azurite.account

    async def download() -> bytes:
        async with BlobStore(account) as store:
            return await store.download(container, blob)

    return hub.node.call(download(), timeout=60)


def put_blob(hub: AzureHub, container: str, blob: str, data: bytes) -> None:
    assert hub.azurite is not None
    account = hub.azurite.account

    async def upload() -> None:
        async with BlobStore(account) as store:
            await store.upload(container, blob, data)

    hub.node.call(upload(), timeout=60)


def upload_with_sas(hub: AzureHub, info: dict[str, Any], data: bytes) -> httpx.Response:
    """Put Blob as a device does with the answer of `POST /devices/{id}/files` (`https://` + hostName)."""
    url = f"https://{info['hostName']}/{info['containerName']}/{info['blobName']}{info['sasToken']}"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(hub.root_ca)), timeout=60) as storage:
        return storage.put(url, content=data, headers={"x-ms-blob-type": "BlockBlob"})


def take_notification(
    rest: httpx.Client, blob_name: str, *, complete: bool = True
) -> tuple[dict[str, Any], str]:
    """Receive file upload notification batches until one carries `blob_name`: (that notification, the
    batch's lock token). Batches without it are completed (nothing else in the suite waits for them);
    the one with it too, unless `complete` is False."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = rest.get(f"/messages/serviceBound/filenotifications?timeout=5&{API}")
        if r.status_code == 204:
            continue
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
        lock = r.headers["ETag"].strip('"')
        found = [n for n in r.json() if n["blobName"] == blob_name]
        if not found or complete:
            assert rest.delete(f"/messages/serviceBound/filenotifications/{lock}?{API}").status_code == 204
        if found:
            return found[0], lock
    raise AssertionError(f"no file upload notification for {blob_name}")


class StallingStorage:
    """A TLS endpoint on 127.0.0.86:443 (certificate from the hub's dev root) that reads requests and
    answers none until `release` is set (then 403, which the storage SDK does not retry): an
    import/export job writing there stays `running` for as long as a test needs, so cancelling it is
    not a race with the job's end."""

    def __init__(self, pki_dir: Path) -> None:
        _, cert, key = server_cert(pki_dir, STALL_IP)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self._sock = socket.create_server((STALL_IP, 443))
        self._sock.settimeout(0.2)  # the accept loop sees `close` (closing alone does not wake it)
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stalling-storage", daemon=True)
        self._thread.start()

    def container_uri(self) -> str:
        return f"https://{STALL_IP}/account/stalled?sv=2021-08-06&sr=c&sp=rwcl&sig=c3RhbGw%3D"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            with self._tls.wrap_socket(conn, server_side=True) as tls:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                self.arrived.set()
                self.release.wait(120)
                # read the whole body first: closing on unread data resets the connection, which the
                # storage SDK retries (after 15 s and more) instead of failing at once
                headers, _, body = head.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", headers)
                remaining = (int(length[1]) if length else 0) - len(body)
                while remaining > 0 and (chunk := tls.recv(min(remaining, 65536))):
                    remaining -= len(chunk)
                tls.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:  # includes ssl.SSLError: the client gave up
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.release.set()
        self._closed.set()
        self._thread.join(10)
        self._sock.close()
