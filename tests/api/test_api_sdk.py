"""The real azure-iot-hub SDK (IoTHubRegistryManager) against Tether over TLS.

The SDK always dials `https://{HostName}`, so the app is served through `tether.security.tls`
with a dev-PKI server certificate for 127.0.0.1, and `REQUESTS_CA_BUNDLE` points at the dev root.
The TLS listener is bound first (port 0), so the hub's host name can include the real port — the
SDK signs its tokens for `HostName`, port included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from api_helpers import make_hub, new_key

from tether.api.app import build_app
from tether.config import TlsSettings
from tether.hub import Hub
from tether.security.pki import PkiFiles, init_pki
from tether.security.tls import TlsContextFactory, start_tls_server


@dataclass
class TlsHub:
    hub: Hub
    port: int
    pki: PkiFiles


@pytest.fixture
async def tls_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TlsHub]:
    pki = init_pki(tmp_path / "pki", ["localhost"], ["127.0.0.1"])
    tls = TlsContextFactory(TlsSettings(), pki.server_cert, pki.server_key)
    holder: dict[str, Callable[[], asyncio.Protocol]] = {}

    def protocol() -> asyncio.Protocol:  # the aiohttp server exists only once the hub does
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
        yield TlsHub(hub, port, pki)
    finally:
        server.close()
        await runner.cleanup()
        await hub.close()


async def test_registry_manager_crud_over_tls(tls_hub: TlsHub) -> None:
    from azure.iot.hub import IoTHubRegistryManager  # type: ignore[import-untyped]
    from msrest.exceptions import HttpOperationError

    conn_str = await tls_hub.hub.service_connection_string("iothubowner")
    assert f"HostName=127.0.0.1:{tls_hub.port};" in conn_str
    primary, secondary = new_key(), new_key()

    def run_sdk() -> dict[str, Any]:
        rm = IoTHubRegistryManager.from_connection_string(conn_str)
        out: dict[str, Any] = {}
        created = rm.create_device_with_sas("sdk-dev", primary, secondary, "enabled")
        out["created"] = created
        fetched = rm.get_device("sdk-dev")
        out["fetched"] = fetched
        updated = rm.update_device_with_sas("sdk-dev", fetched.etag, primary, secondary, "disabled",
                                            status_reason="by sdk")
        out["updated"] = updated
        try:
            rm.update_device_with_sas("sdk-dev", fetched.etag, primary, secondary, "enabled")
        except HttpOperationError as exc:
            out["stale_status"] = exc.response.status_code
        out["twin"] = rm.get_twin("sdk-dev")
        out["stats"] = rm.get_device_registry_statistics()
        rm.create_device_with_sas("sdk-dev2", new_key(), new_key(), "enabled")
        out["listed"] = [d.device_id for d in rm.get_devices(10)]
        rm.delete_device("sdk-dev", updated.etag)
        rm.delete_device("sdk-dev2")
        try:
            rm.get_device("sdk-dev")
        except HttpOperationError as exc:
            out["gone_status"] = exc.response.status_code
        return out

    out = await asyncio.to_thread(run_sdk)
    created, fetched, updated = out["created"], out["fetched"], out["updated"]
    assert created.device_id == "sdk-dev" and created.status == "enabled"
    assert created.authentication.symmetric_key.primary_key == primary
    assert fetched.etag == created.etag
    assert updated.status == "disabled" and updated.status_reason == "by sdk"
    assert updated.etag != fetched.etag
    assert out["stale_status"] == 412
    twin = out["twin"]
    assert twin.device_id == "sdk-dev" and twin.status == "disabled"
    assert twin.properties.desired["$version"] == 1
    assert out["stats"].total_device_count == 1
    assert out["listed"] == ["sdk-dev", "sdk-dev2"]
    assert out["gone_status"] == 404
    assert (await tls_hub.hub.registry.statistics()).total_device_count == 0
    await tls_hub.hub.audit.flush()
    allowed = await tls_hub.hub.audit.query(action_prefix="auth.rest", outcome="allowed", limit=1000)
    assert allowed and all(r.principal == "policy:iothubowner" for r in allowed)
    assert all((r.peer or "").startswith("127.0.0.1:") for r in allowed)


async def test_sdk_bulk_create_get_and_bulk_delete_100_devices(tls_hub: TlsHub) -> None:
    """`bulk_create_or_update_devices` with ExportImportDevice objects: create 100, a refused batch
    (400 + BulkRegistryOperationResult, nothing written), then delete the 100 in one call."""
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import AuthenticationMechanism, ExportImportDevice, SymmetricKey

    conn_str = await tls_hub.hub.service_connection_string("iothubowner")
    keys = {f"bulk-{i:03d}": (new_key(), new_key()) for i in range(100)}

    def run_sdk() -> dict[str, Any]:
        rm = IoTHubRegistryManager.from_connection_string(conn_str)
        out: dict[str, Any] = {}
        creates = [
            ExportImportDevice(id=device_id, import_mode="create", status="enabled",
                               authentication=AuthenticationMechanism(
                                   type="sas", symmetric_key=SymmetricKey(primary_key=p, secondary_key=s)))
            for device_id, (p, s) in keys.items()
        ]
        out["created"] = rm.bulk_create_or_update_devices(creates)
        out["fetched"] = [rm.get_device(device_id) for device_id in ("bulk-000", "bulk-042", "bulk-099")]
        again = [ExportImportDevice(id="bulk-007", import_mode="create"),
                 ExportImportDevice(id="bulk-new", import_mode="create"),
                 ExportImportDevice(id="ghost", import_mode="delete")]
        out["refused"] = rm.bulk_create_or_update_devices(again)
        out["stats_after_refusal"] = rm.get_device_registry_statistics()
        deletes = [ExportImportDevice(id=device_id, import_mode="delete") for device_id in keys]
        out["deleted"] = rm.bulk_create_or_update_devices(deletes)
        out["stats"] = rm.get_device_registry_statistics()
        return out

    out = await asyncio.to_thread(run_sdk)
    created = out["created"]
    assert created.is_successful is True and created.errors == [] and created.warnings == []
    for device in out["fetched"]:
        primary, secondary = keys[device.device_id]
        assert device.status == "enabled" and device.etag
        assert device.authentication.symmetric_key.primary_key == primary
        assert device.authentication.symmetric_key.secondary_key == secondary
    refused = out["refused"]
    assert refused.is_successful is False
    assert {(e.device_id, e.error_code, e.operation) for e in refused.errors} == {
        ("bulk-007", "DeviceAlreadyExists", "create"), ("ghost", "DeviceNotFound", "delete")}
    assert out["stats_after_refusal"].total_device_count == 100  # bulk-new was not created
    assert out["deleted"].is_successful is True
    assert out["stats"].total_device_count == 0
    assert await tls_hub.hub.registry.find("bulk-050") is None
