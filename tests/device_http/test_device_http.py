"""Azure's device HTTPS surface end to end over a real aiohttp server: telemetry into the stream,
C2D receive/complete/reject/abandon, and device authentication (wrong device, no credential)."""

from __future__ import annotations

import json

import httpx
import pytest
from c2d.helpers import c2d_of_hub, create_device, device_token, policy_token, refused
from hub_app_helpers import API

from tether.hub import Hub
from tether.messaging.events import EventData
from tether.registry.models import Device


@pytest.fixture
async def dev1(hub: Hub) -> Device:
    return await create_device(hub.registry, "dev1")


@pytest.fixture
async def device(dev1: Device, base_url: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=base_url, headers={"Authorization": device_token(dev1)}, timeout=30)
    async with client:
        yield client  # type: ignore[misc]


async def events_of(hub: Hub, device_id: str) -> list[EventData]:
    partition = hub.stream.partition_for(device_id)
    return [e for e in await hub.stream.read(partition, from_sequence=0, max_count=1000)
            if e.device_id == device_id]


async def send_c2d(hub: Hub, body: bytes = b"x", **kwargs: object) -> None:
    await c2d_of_hub(hub).send("dev1", body, actor="policy:service", **kwargs)  # type: ignore[arg-type]


async def test_telemetry_lands_in_the_stream_with_its_properties(hub: Hub, device: httpx.AsyncClient) -> None:
    r = await device.post(f"/devices/dev1/messages/events{API}", content=b'{"t": 21.5}', headers={
        "iothub-messageid": "m1", "iothub-correlationid": "c1", "Content-Type": "application/json",
        "Content-Encoding": "utf-8", "iothub-app-alert": "high temp", "iothub-app-zone": "a/b"})
    assert r.status_code == 204, r.text
    [event] = await events_of(hub, "dev1")  # durable before the 204
    assert event.body == b'{"t": 21.5}'
    assert event.properties == {"alert": "high temp", "zone": "a/b"}
    system = event.system_properties
    assert system["message-id"] == "m1" and system["correlation-id"] == "c1"
    assert system["content-type"] == "application/json" and system["content-encoding"] == "utf-8"
    assert system["iothub-connection-device-id"] == "dev1"
    assert json.loads(system["iothub-connection-auth-method"])["type"] == "sas"


async def test_oversized_telemetry_is_413(hub: Hub, device: httpx.AsyncClient) -> None:
    r = await device.post(f"/devices/dev1/messages/events{API}", content=b"x" * (262_144 + 1))
    assert r.status_code == 413 and r.json()["errorCode"] == "MessageTooLarge"
    assert await events_of(hub, "dev1") == []
    r = await device.post(f"/devices/dev1/messages/events{API}", content=b"x" * 262_144)
    assert r.status_code == 204


async def test_receive_and_complete(hub: Hub, device: httpx.AsyncClient) -> None:
    url = f"/devices/dev1/messages/deviceBound{API}"
    assert (await device.get(url)).status_code == 204
    await send_c2d(hub, b"hello", message_id="m1", correlation_id="c1", ack="full",
                   content_type="text/plain", properties={"zone": "a/b"})
    r = await device.get(url)
    assert r.status_code == 200 and r.content == b"hello"
    h = r.headers
    assert h["iothub-messageid"] == "m1" and h["iothub-correlationid"] == "c1"
    assert h["iothub-to"] == "/devices/dev1/messages/deviceBound" and h["iothub-deliverycount"] == "1"
    assert int(h["iothub-sequencenumber"]) > 0 and h["iothub-expiry"].endswith("Z")
    assert h["iothub-ack"] == "full" and h["iothub-app-zone"] == "a/b"
    assert h["content-type"].startswith("text/plain")
    etag = h["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert (await device.get(url)).status_code == 204  # locked
    lock = etag.strip('"')
    assert (await device.delete(f"/devices/dev1/messages/deviceBound/{lock}{API}")).status_code == 204
    assert (await device.get(url)).status_code == 204
    r = await device.delete(f"/devices/dev1/messages/deviceBound/{lock}{API}")
    assert r.status_code == 412 and r.json()["errorCode"] == "DeviceMessageLockLost"
    batch = await c2d_of_hub(hub).feedback.receive(timeout_s=3)
    assert batch is not None and [f.status_code for f in batch.records] == ["Success"]


async def test_reject_gives_rejected_feedback(hub: Hub, device: httpx.AsyncClient,
                                              base_url: str) -> None:
    await send_c2d(hub, message_id="m1", ack="negative")
    r = await device.get(f"/devices/dev1/messages/deviceBound{API}")
    lock = r.headers["ETag"].strip('"')
    r = await device.delete(f"/devices/dev1/messages/deviceBound/{lock}{API}&reject")
    assert r.status_code == 204
    assert (await device.get(f"/devices/dev1/messages/deviceBound{API}")).status_code == 204
    headers = {"Authorization": await policy_token(hub)}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as service:
        r = await service.get(f"/messages/serviceBound/feedback{API}&timeout=3")
    assert r.status_code == 200
    assert [(f["originalMessageId"], f["statusCode"]) for f in r.json()] == [("m1", "Rejected")]


async def test_abandon_redelivers_with_delivery_count_2(hub: Hub, device: httpx.AsyncClient) -> None:
    await send_c2d(hub, b"again", message_id="m1")
    first = await device.get(f"/devices/dev1/messages/deviceBound{API}")
    lock = first.headers["ETag"]  # quoted, as a client would echo it
    r = await device.post(f"/devices/dev1/messages/deviceBound/{lock}/abandon{API}")
    assert r.status_code == 204
    second = await device.get(f"/devices/dev1/messages/deviceBound{API}")
    assert second.status_code == 200 and second.content == b"again"
    assert second.headers["iothub-messageid"] == "m1" and second.headers["iothub-deliverycount"] == "2"
    assert second.headers["ETag"] != lock


async def test_token_for_another_device_is_refused_and_audited(hub: Hub, dev1: Device, base_url: str) -> None:
    dev2 = await create_device(hub.registry, "dev2")
    await send_c2d(hub, message_id="secret")
    headers = {"Authorization": device_token(dev2)}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as intruder:
        r = await intruder.get(f"/devices/dev1/messages/deviceBound{API}")
        assert r.status_code == 401 and r.json()["errorCode"] == "IotHubUnauthorizedAccess"
        r = await intruder.post(f"/devices/dev1/messages/events{API}", content=b"spoof")
        assert r.status_code == 401
        assert (await intruder.delete(f"/devices/dev1/messages/deviceBound/x{API}")).status_code == 401
    records = await refused(hub)
    assert len(records) == 3
    assert {(x.target, x.reason) for x in records} == {("dev1", "wrong-scope")}
    assert all((x.peer or "").startswith("127.0.0.1:") for x in records)
    assert await c2d_of_hub(hub).queue_depth("dev1") == 1  # nothing was taken
    assert await events_of(hub, "dev1") == []


async def test_no_credentials_is_401(hub: Hub, dev1: Device, anon: httpx.AsyncClient) -> None:
    r = await anon.get(f"/devices/dev1/messages/deviceBound{API}")
    assert r.status_code == 401 and r.json()["errorCode"] == "IotHubUnauthorizedAccess"
    assert (await anon.post(f"/devices/dev1/messages/events{API}", content=b"x")).status_code == 401
    assert [x.reason for x in await refused(hub)] == ["missing-credentials"] * 2


async def test_service_token_is_not_a_device_credential(hub: Hub, dev1: Device,
                                                        anon: httpx.AsyncClient) -> None:
    headers = {"Authorization": await policy_token(hub, "service")}
    r = await anon.get(f"/devices/dev1/messages/deviceBound{API}", headers=headers)
    assert r.status_code == 403  # a valid policy, but without DeviceConnect
    policy_for_devices = {"Authorization": await policy_token(hub, "device")}  # hub-level DeviceConnect
    r = await anon.get(f"/devices/dev1/messages/deviceBound{API}", headers=policy_for_devices)
    assert r.status_code == 204


async def test_disabled_device_is_refused(hub: Hub, device: httpx.AsyncClient) -> None:
    await hub.registry.set_status("dev1", False, actor="test")
    r = await device.get(f"/devices/dev1/messages/deviceBound{API}")
    assert r.status_code == 401
    assert [x.reason for x in await refused(hub)] == ["device-disabled"]
