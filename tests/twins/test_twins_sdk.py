"""The real azure-iot-hub SDK's twin and query calls against Tether over TLS (the SDK always dials
`https://{HostName}`; the dev root is trusted through REQUESTS_CA_BUNDLE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hub_app_helpers import make_hub, new_key

from tether.api.app import build_app
from tether.config import TlsSettings
from tether.hub import Hub
from tether.security.pki import init_pki
from tether.security.tls import TlsContextFactory, start_tls_server


@pytest.fixture
async def tls_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hub]:
    pki = init_pki(tmp_path / "pki", ["localhost"], ["127.0.0.1"])
    tls = TlsContextFactory(TlsSettings(), pki.server_cert, pki.server_key)
    holder: dict[str, Callable[[], asyncio.Protocol]] = {}

    def protocol() -> asyncio.Protocol:
        return holder["server"]()

    server = await start_tls_server(protocol, "127.0.0.1", 0, tls)
    port = server.sockets[0].getsockname()[1]
    hub = make_hub(tmp_path / "hub", hostname=f"127.0.0.1:{port}")
    await hub.open()
    runner = web.AppRunner(build_app(hub), access_log=None)
    await runner.setup()
    assert runner.server is not None
    holder["server"] = runner.server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.root_cert))
    try:
        yield hub
    finally:
        server.close()
        await runner.cleanup()
        await hub.close()


async def test_registry_manager_twin_calls(tls_hub: Hub) -> None:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties
    from msrest.exceptions import HttpOperationError

    conn_str = await tls_hub.service_connection_string("iothubowner")

    def run_sdk() -> dict[str, Any]:
        rm = IoTHubRegistryManager.from_connection_string(conn_str)
        out: dict[str, Any] = {}
        for i in range(3):
            rm.create_device_with_sas(f"sdk-{i}", new_key(), new_key(), "enabled")
        twin = rm.get_twin("sdk-0")
        out["fetched"] = twin
        patch = Twin(tags={"site": "a"}, properties=TwinProperties(desired={"rate": 7}))
        out["updated"] = rm.update_twin("sdk-0", patch, twin.etag)
        try:
            rm.update_twin("sdk-0", Twin(tags={"site": "b"}), twin.etag)
        except HttpOperationError as exc:
            out["stale_status"] = exc.response.status_code
        out["replaced"] = rm.replace_twin(
            "sdk-0", Twin(tags={"site": "c"}, properties=TwinProperties(desired={}))
        )
        rm.update_twin("sdk-1", Twin(tags={"site": "c"}))
        result = rm.query_iot_hub(
            QuerySpecification(query="SELECT * FROM devices WHERE tags.site = 'c'"), None, 1
        )
        out["page1"] = result
        out["page2"] = rm.query_iot_hub(
            QuerySpecification(query="SELECT * FROM devices WHERE tags.site = 'c'"),
            result.continuation_token,
            1,
        )
        return out

    out = await asyncio.to_thread(run_sdk)
    fetched, updated, replaced = out["fetched"], out["updated"], out["replaced"]
    assert fetched.device_id == "sdk-0" and fetched.version == 1
    assert updated.tags == {"site": "a"} and updated.properties.desired["rate"] == 7
    assert updated.properties.desired["$version"] == 2 and updated.etag != fetched.etag
    assert out["stale_status"] == 412
    assert replaced.tags == {"site": "c"} and "rate" not in replaced.properties.desired
    assert replaced.properties.desired["$version"] == 3
    page1, page2 = out["page1"], out["page2"]
    assert page1.type == "twin" and [t.device_id for t in page1.items] == ["sdk-0"]
    assert page1.continuation_token
    assert [t.device_id for t in page2.items] == ["sdk-1"] and page2.continuation_token is None
