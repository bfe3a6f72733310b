"""Azurite (Microsoft's Azure Storage API server, npm `azurite`) for the tests that need real blob storage.

`tools/azurite/` pins it (package.json + package-lock.json); `ensure_azurite()` runs `npm ci` there
into the git-ignored `node_modules` once (`make azurite` does the same). `AzuriteServer` starts
`azurite-blob` over HTTPS on a loopback address (port 443 by default: the device SDKs build
`https://{hostName}/…`) with a certificate from the hub's dev PKI for that address, in memory, with
a fresh random account (`AZURITE_ACCOUNTS`), and stops it. The `azurite_server` fixture factory gives
a test directory a running server; `tests/<area>/conftest.py` re-exports it.

Never skipped: npm and Node are part of the development and CI machines (a missing `npm` fails).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether.security import pki
from tether.storage.blob import BlobAccount

ROOT = Path(__file__).resolve().parents[1]
AZURITE_DIR = ROOT / "tools" / "azurite"
AZURITE_BIN = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"


def ensure_azurite() -> Path:
    """`npm ci` into tools/azurite/node_modules (git-ignored) from the committed lock file, once."""
    lock = AZURITE_DIR / "package-lock.json"
    stamp = AZURITE_DIR / "node_modules" / ".tether-installed"
    if AZURITE_BIN.exists() and stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return AZURITE_BIN
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed for the blob storage tests (Node 20 + npm run Azurite)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=AZURITE_DIR, check=True, timeout=900,
                   stdout=subprocess.DEVNULL)
    stamp.touch()
    return AZURITE_BIN


def server_cert(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """(dev root CA, certificate, key) for `ip`, from the dev PKI in `directory`."""
    files = pki.init_pki(directory, ["localhost"], [ip])
    root, root_key = pki.load_certificate(files.root_cert), pki.load_private_key(files.root_key)
    cert, key = pki.server_cert_for_ip(ip, root, root_key)
    cert_file, key_file = directory / f"azurite-{ip}.pem", directory / f"azurite-{ip}.key"
    pki.write_certificates(cert_file, [cert])
    pki.write_private_key(key_file, key)
    return files.root_cert, cert_file, key_file


@dataclass
class AzuriteServer:
    """A running `azurite-blob`: `account` is the hub's view of it (name, key, endpoint, CA)."""

    ip: str
    port: int
    account: BlobAccount
    ca_file: Path
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def host(self) -> str:
        return self.ip if self.port == 443 else f"{self.ip}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_azurite(work_dir: Path, ip: str, *, port: int = 443, ca_dir: Path | None = None,
                  account_name: str | None = None) -> AzuriteServer:
    """Start Azurite's blob service on `ip:port` over HTTPS and wait until it accepts connections."""
    binary = ensure_azurite()
    work_dir.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = server_cert(ca_dir or work_dir / "pki", ip)
    name = account_name or f"tether{secrets.token_hex(4)}"
    key = base64.b64encode(os.urandom(64)).decode()
    env = {**os.environ, "AZURITE_ACCOUNTS": f"{name}:{key}"}
    log_file = work_dir / f"azurite-{ip}.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [str(binary), "--blobHost", ip, "--blobPort", str(port), "--cert", str(cert_file),
             "--key", str(key_file), "--loose", "--skipApiVersionCheck", "--disableTelemetry",
             "--inMemoryPersistence"],
            cwd=work_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    endpoint = f"https://{ip}{'' if port == 443 else f':{port}'}/{name}"
    account = BlobAccount.create(name, key, endpoint, ca_file)
    server = AzuriteServer(ip, port, account, ca_file, process, log_file)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"azurite exited: {log_file.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"azurite did not listen on {ip}:{port} within 60 s") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def azurite_server(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """Azurite on the module's `AZURITE_IP` (port 443), for the whole test module."""
    ip = getattr(request.module, "AZURITE_IP", None)
    assert ip, "set AZURITE_IP (one of your reserved loopback addresses) in the test module"
    server = start_azurite(tmp_path_factory.mktemp("azurite"), ip)
    try:
        yield server
    finally:
        server.stop()
