"""Console browser test helpers: the real hub (`server.start_listeners`: HTTPS with the console, MQTT over
TLS on 8883) on 127.0.0.102 with a certificate for that address, a test OIDC issuer on 127.0.0.103,
Debian's chromium driven headless by Playwright. The hub runs on its own event loop in a thread so the
synchronous Playwright and Azure SDK clients can be driven from plain test functions."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "methods"))
sys.path.insert(0, str(HERE.parent / "operators"))

from methods_helpers import make_certs  # noqa: E402
from oidc_issuer import IssuerServer, running_issuer  # noqa: E402

from tether.config import load_settings  # noqa: E402
from tether.hub import Hub  # noqa: E402
from tether.registry.models import Device  # noqa: E402
from tether.server import start_listeners  # noqa: E402

T = TypeVar("T")
HUB_IP = "127.0.0.102"
ISSUER_IP = "127.0.0.103"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = HERE.parent / "artifacts" / "console"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery staple"


def ensure_chromium() -> None:
    """Debian's chromium, installed by the test setup when missing (never `playwright install`)."""
    if CHROMIUM.exists():
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError("chromium is missing and apt-get is not available to install it")
    subprocess.run([apt, "update", "-q"], check=True, timeout=600)
    subprocess.run([apt, "install", "-y", "-q", "chromium"], check=True, timeout=900)
    if not CHROMIUM.exists():
        raise RuntimeError("apt-get install chromium did not provide /usr/bin/chromium")


class ConsoleHub:
    """A started hub with every listener, plus the issuer, on a private loop in a daemon thread."""

    def __init__(self, data_dir: Path) -> None:
        self.ca_file, cert, key = make_certs(data_dir / "pki", HUB_IP)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="console-hub", daemon=True)
        self._thread.start()
        person = {"roles": ["Tether.Owner"], "preferred_username": "carol"}
        self.issuer = IssuerServer(ISSUER_IP, login_subject="carol", login_claims=person)
        self._issuer_cm = running_issuer(ISSUER_IP, self.issuer)
        self.call(self._issuer_cm.__aenter__())
        owners = [{"value": "Tether.Owner", "role": "Owner"}]
        provider = {**self.issuer.provider_settings(), "claim_roles": owners}
        self.settings = load_settings(
            hub={"hostname": HUB_IP, "data_dir": data_dir},
            tls={"cert_file": cert, "key_file": key},
            listeners={"host": HUB_IP, "mqtt_port": 8883, "https_port": 0},
            operators={"oidc": [provider]},
        )
        self.hub = Hub(self.settings)
        self.call(self.hub.open())
        self.call(start_listeners(self.hub))
        self.url = f"https://{HUB_IP}:{self.hub.ports['https']}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_operator(self, username: str, role: str, scope: str | None = None) -> None:
        async def add() -> None:
            await self.hub.operators.add(username, PASSWORD, actor="test")
            await self.hub.roles.assign("local", username, role, scope, actor="test")

        self.call(add())

    def device(self, device_id: str) -> Device:
        return self.call(self.hub.registry.get(device_id))

    def connection_string(self, device_id: str) -> str:
        key = self.device(device_id).authentication.symmetric_key.primary_key
        return f"HostName={HUB_IP};DeviceId={device_id};SharedAccessKey={key}"

    def stop(self) -> None:
        try:
            self.call(self.hub.close())
            self.call(self._issuer_cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
