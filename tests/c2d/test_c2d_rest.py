"""Service-side C2D REST over a real aiohttp server: send, purge, feedback batches, limits, rights."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
from hub_app_helpers import API

from c2d.helpers import c2d_of_hub, create_device, policy_token
from tether.api.app import build_app
from tether.hub import Hub
from tether.messaging.feedback import FEEDBACK_CONTENT_TYPE


async def test_send_queues_the_message_with_its_properties(hub: Hub, service: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    r = await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"\x00\x01binary", headers={
        "iothub-messageid": "m1", "iothub-correlationid": "c1", "iothub-ack": "Full", "iothub-ttl": "120",
        "iothub-userid": "ops", "Content-Type": "application/octet-stream", "iothub-contentencoding": "none",
        "iothub-app-zone": "a/b", "iothub-app-level": "3"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["messageId"] == "m1" and body["deviceId"] == "dev1" and r.headers["iothub-messageid"] == "m1"
    expiry = datetime.fromisoformat(body["expiryTimeUtc"].replace("Z", "+00:00"))
    enqueued = datetime.fromisoformat(body["enqueuedTimeUtc"].replace("Z", "+00:00"))
    assert abs((expiry - enqueued).total_seconds() - 120) < 1
    got = await c2d_of_hub(hub).receive("dev1")
    assert got is not None
    assert (got.body, got.correlation_id, got.ack, got.user_id) == (b"\x00\x01binary", "c1", "full", "ops")
    assert (got.content_type, got.content_encoding) == ("application/octet-stream", "none")
    assert got.properties == {"zone": "a/b", "level": "3"}
    await hub.audit.flush()
    sends = await hub.audit.query(action_prefix="c2d.send")
    assert sends[0].principal == "policy:service" and sends[0].target == "dev1"


async def test_absolute_expiry_header(hub: Hub, service: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    at = datetime.now(UTC) + timedelta(minutes=10)
    r = await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x",
                           headers={"iothub-expiry": at.isoformat()})
    assert r.status_code == 201, r.text
    expiry = datetime.fromisoformat(r.json()["expiryTimeUtc"].replace("Z", "+00:00"))
    assert abs((expiry - at).total_seconds()) < 1
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    r = await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x",
                           headers={"iothub-expiry": past})
    assert r.status_code == 400 and r.json()["field"] == "iothub-expiry"


async def test_send_refusals(hub: Hub, service: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    url = f"/devices/dev1/messages/deviceBound{API}"
    r = await service.post(url, content=b"x" * 65_537)
    assert r.status_code == 400 and r.json()["errorCode"] == "MessageTooLarge"
    r = await service.post(url, content=b"x", headers={"iothub-ack": "maybe"})
    assert r.status_code == 400 and r.json()["field"] == "ack"
    r = await service.post(url, content=b"x", headers={"iothub-ttl": "172801"})
    assert r.status_code == 400
    r = await service.post(f"/devices/ghost/messages/deviceBound{API}", content=b"x")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    assert await c2d_of_hub(hub).queue_depth("dev1") == 0


async def test_queue_depth_is_refused_with_403(hub: Hub, service: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    for _ in range(50):
        r = await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x")
        assert r.status_code == 201
    r = await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x")
    assert r.status_code == 403 and r.json()["errorCode"] == "DeviceMaximumQueueDepthExceeded"


async def test_registry_policy_cannot_send_or_purge(hub: Hub, anon: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    headers = {"Authorization": await policy_token(hub, "registryReadWrite")}
    r = await anon.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x", headers=headers)
    assert r.status_code == 403 and r.json()["errorCode"] == "IotHubUnauthorizedAccess"
    assert (await anon.delete(f"/devices/dev1/commands{API}", headers=headers)).status_code == 403
    assert (await anon.get(f"/messages/serviceBound/feedback{API}")).status_code == 401


async def test_purge_answers_azure_shape(hub: Hub, service: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    for ack in ("none", "negative"):
        await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x",
                           headers={"iothub-ack": ack, "iothub-messageid": f"m-{ack}"})
    r = await service.delete(f"/devices/dev1/commands{API}")
    assert r.status_code == 200 and r.json() == {"totalMessagesPurged": 2, "deviceId": "dev1"}
    r = await service.get(f"/messages/serviceBound/feedback{API}&timeout=3")
    assert r.status_code == 200
    assert [(f["originalMessageId"], f["statusCode"]) for f in r.json()] == [("m-negative", "Purged")]
    assert (await service.delete(f"/devices/ghost/commands{API}")).status_code == 404


async def test_positive_ack_feedback_batch_is_received_and_completed(hub: Hub,
                                                                    service: httpx.AsyncClient) -> None:
    await create_device(hub.registry, "dev1")
    c2d = c2d_of_hub(hub)
    for i in range(2):
        await service.post(f"/devices/dev1/messages/deviceBound{API}", content=b"x",
                           headers={"iothub-ack": "positive", "iothub-messageid": f"m{i}"})
        got = await c2d.receive("dev1")
        assert got is not None and got.lock_token
        await c2d.complete("dev1", got.lock_token)

    r = await service.get(f"/messages/serviceBound/feedback{API}&timeout=5")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FEEDBACK_CONTENT_TYPE)
    records = json.loads(r.content)
    assert [(f["originalMessageId"], f["statusCode"], f["description"]) for f in records] == [
        ("m0", "Success", "Success"), ("m1", "Success", "Success")]
    assert set(records[0]) == {"originalMessageId", "description", "deviceGenerationId", "deviceId",
                               "enqueuedTimeUtc", "statusCode"}
    lock = r.headers["ETag"].strip('"')

    assert (await service.get(f"/messages/serviceBound/feedback{API}")).status_code == 204  # locked
    r = await service.post(f"/messages/serviceBound/feedback/{lock}/abandon{API}")
    assert r.status_code == 204
    r = await service.get(f"/messages/serviceBound/feedback{API}")
    assert r.status_code == 200 and len(r.json()) == 2
    lock = r.headers["ETag"].strip('"')
    assert (await service.delete(f"/messages/serviceBound/feedback/{lock}{API}")).status_code == 204
    assert (await service.get(f"/messages/serviceBound/feedback{API}")).status_code == 204  # gone
    r = await service.delete(f"/messages/serviceBound/feedback/{lock}{API}")
    assert r.status_code == 412
    r = await service.get(f"/messages/serviceBound/feedback{API}&timeout=999")
    assert r.status_code == 400 and r.json()["field"] == "timeout"


async def test_openapi_documents_every_route(anon: httpx.AsyncClient, base_url: str, hub: Hub) -> None:
    spec = (await anon.get("/openapi.json")).json()
    paths = spec["paths"]
    assert paths["/devices/{id}/messages/deviceBound"]["post"]["x-required-permission"] == "ServiceConnect"
    assert paths["/devices/{id}/messages/deviceBound"]["get"]["x-required-permission"] == "DeviceConnect"
    assert "delete" in paths["/devices/{id}/commands"]
    assert {"get"} <= set(paths["/messages/serviceBound/feedback"])
    assert "post" in paths["/devices/{id}/messages/events"]

    app = build_app(hub)
    registered = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource}
    documented = {(m, path) for path, ops in paths.items() for m in ops}
    assert registered == documented
