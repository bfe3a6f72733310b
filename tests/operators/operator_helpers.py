"""The hub and issuer the operator tests run against (see conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from oidc_issuer import IssuerServer, running_issuer

from tether.api.app import build_app
from tether.config import load_settings
from tether.hub import Hub
from tether.storage.base import AuditRecord

HUB_IP = "127.0.0.100"
ISSUER_IP = "127.0.0.101"
API = "?api-version=2021-04-12"
PASSWORD = "correct horse battery staple"
CLAIM_ROLES = [
    {"value": "Tether.Owner", "role": "Owner"},
    {"value": "Tether.Reader", "role": "DataReader"},
    {"value": "site-a-twins", "role": "TwinContributor", "scope": "tags.site = 'a'"},
]


@dataclass
class OperatorEnv:
    hub: Hub
    url: str
    issuer: IssuerServer
    client: httpx.AsyncClient

    async def audit(self, prefix: str = "auth.", outcome: str | None = None,
                    limit: int = 50) -> list[AuditRecord]:
        return await self.hub.audit.query(limit=limit, action_prefix=prefix, outcome=outcome)

    async def last_refusal(self, action: str = "auth.rest") -> AuditRecord:
        records = await self.audit(action, "refused", limit=1)
        assert records, f"no refused {action} record"
        return records[0]

    async def login(self, username: str, password: str = PASSWORD, code: str | None = None) -> httpx.Response:
        return await self.client.post("/console/auth/login",
                                      json={"username": username, "password": password, "code": code})

    def session_client(self, response: httpx.Response) -> httpx.AsyncClient:
        """A client carrying the session cookie and CSRF token of a successful sign-in."""
        cookie = response.cookies.get("tether-session")
        assert cookie, response.headers
        return httpx.AsyncClient(base_url=self.url, cookies={"tether-session": cookie},
                                 headers={"X-CSRF-Token": response.json()["csrf"]}, timeout=30)


@asynccontextmanager
async def operator_env(tmp_path: Path, **operators: Any) -> AsyncIterator[OperatorEnv]:
    async with running_issuer(ISSUER_IP) as issuer:
        provider = issuer.provider_settings(claim_roles=CLAIM_ROLES, **operators.pop("provider", {}))
        settings = load_settings(hub={"hostname": "localhost", "data_dir": tmp_path / "hub"},
                                 operators={"oidc": [provider], "cookie_secure": False, **operators})
        hub = Hub(settings)
        await hub.open()
        runner = web.AppRunner(build_app(hub), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HUB_IP, 0)
        await site.start()
        url = f"http://{HUB_IP}:{runner.addresses[0][1]}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield OperatorEnv(hub, url, issuer, client)
        finally:
            await runner.cleanup()
            await hub.close()
