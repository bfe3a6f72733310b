"""Helpers for the REST API tests: a real hub on a temp data dir, served by aiohttp on a real
127.0.0.1 socket (ephemeral port), httpx clients and policy tokens. Fixtures are in conftest.py."""

from __future__ import annotations

from typing import Any

import httpx
from hub_app_helpers import API, HOST, make_hub, new_key, policy_token, serving

__all__ = ["API", "HOST", "create", "device_body", "make_hub", "new_key", "policy_token", "serving"]


def device_body(device_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "deviceId": device_id,
        "status": "enabled",
        "authentication": {
            "type": "sas",
            "symmetricKey": {"primaryKey": new_key(), "secondaryKey": new_key()},
        },
        "capabilities": {"iotEdge": False},
        **extra,
    }


async def create(client: httpx.AsyncClient, device_id: str, **extra: Any) -> dict[str, Any]:
    r = await client.put(f"/devices/{device_id}{API}", json=device_body(device_id, **extra))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body
