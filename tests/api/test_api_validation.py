"""Bad input is refused with 400/413 naming the field, as JSON, and nothing is written."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
from api_helpers import API, create, device_body, new_key

from tether.api.app import build_app
from tether.hub import Hub


async def assert_empty(hub: Hub) -> None:
    stats = await hub.registry.statistics()
    assert stats.total_device_count == 0


def assert_error(r: httpx.Response, status: int, field: str | None = None) -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, str] = r.json()
    assert body["errorCode"] and body["Message"].startswith(f"ErrorCode:{body['errorCode']};")
    assert r.headers["iothub-errorcode"] == body["errorCode"]  # Azure's header on every error
    if field is not None:
        assert field in body.get("field", ""), body
    return body


async def test_malformed_json(client: httpx.AsyncClient, hub: Hub) -> None:
    r = await client.put(f"/devices/v{API}", content=b'{"deviceId": "v",',
                         headers={"Content-Type": "application/json"})
    body = assert_error(r, 400, "body")
    assert body["errorCode"] == "ArgumentInvalid"
    assert body["Message"].split(";", 1)[1].startswith("malformed JSON:")
    assert body["field"] == "body"
    await assert_empty(hub)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"device"', b"42", b"null", b"", b"   "])
async def test_non_object_or_empty_body(client: httpx.AsyncClient, hub: Hub, raw: bytes) -> None:
    assert_error(await client.put(f"/devices/v{API}", content=raw), 400, "body")
    await assert_empty(hub)


@pytest.mark.parametrize("raw", [b'{"deviceId": NaN}', b'{"deviceId": "\xff"}'])
async def test_nan_and_bad_utf8_are_malformed(client: httpx.AsyncClient, hub: Hub, raw: bytes) -> None:
    body = assert_error(await client.put(f"/devices/v{API}", content=raw), 400, "body")
    assert body["Message"].split(";", 1)[1].startswith("malformed JSON")
    await assert_empty(hub)


async def test_unknown_field(client: httpx.AsyncClient, hub: Hub) -> None:
    r = await client.put(f"/devices/v{API}", json=device_body("v", colour="red"))
    assert_error(r, 400, "colour")
    await assert_empty(hub)


@pytest.mark.parametrize("bad_id", ["bad%20id", "x" * 129, "%C3%A9t%C3%A9", "a%2Fb"])
async def test_invalid_device_id_in_path(client: httpx.AsyncClient, hub: Hub, bad_id: str) -> None:
    r = await client.put(f"/devices/{bad_id}{API}", json={"status": "enabled"})
    assert r.status_code in (400, 404), r.text  # "a/b" may not even match the route
    if r.status_code == 400:
        assert_error(r, 400, "deviceId")
    assert_error(await client.get(f"/devices/{'y' * 129}{API}"), 400, "deviceId")
    await assert_empty(hub)


async def test_body_device_id_must_match_path(client: httpx.AsyncClient, hub: Hub) -> None:
    assert_error(await client.put(f"/devices/one{API}", json=device_body("two")), 400, "deviceId")
    await assert_empty(hub)


async def test_non_base64_key(client: httpx.AsyncClient, hub: Hub) -> None:
    body = device_body("k")
    body["authentication"]["symmetricKey"]["primaryKey"] = "not base64!!"
    assert_error(await client.put(f"/devices/k{API}", json=body), 400, "primaryKey")
    body["authentication"]["symmetricKey"]["primaryKey"] = "c2hvcnQ="  # base64 of 5 bytes: too short
    assert_error(await client.put(f"/devices/k{API}", json=body), 400, "primaryKey")
    await assert_empty(hub)


async def test_oversize_body_is_413(client: httpx.AsyncClient, hub: Hub) -> None:
    limit = hub.settings.limits.max_request_body_bytes
    big = device_body("big", statusReason="x")
    padding = "A" * (limit + 10)
    raw = ('{"deviceId": "big", "pad": "' + padding + '"}').encode()
    body = assert_error(await client.put(f"/devices/big{API}", content=raw), 413)
    assert body["errorCode"] == "MessageTooLarge"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the read itself must stop
        yield b'{"deviceId": "big", "pad": "'
        for _ in range(limit // 65536 + 2):
            yield b"A" * 65536
        yield b'"}'

    body = assert_error(await client.put(f"/devices/big{API}", content=chunked()), 413)
    assert body["errorCode"] == "MessageTooLarge"
    assert (await client.put(f"/devices/big{API}", json=big)).status_code == 200  # still serving


@pytest.mark.parametrize("version", ["latest", "2021-4-12", "2021-04-12-beta", "20210412"])
async def test_bad_api_version(client: httpx.AsyncClient, hub: Hub, version: str) -> None:
    r = await client.put(f"/devices/v?api-version={version}", json=device_body("v"))
    assert_error(r, 400, "api-version")
    await assert_empty(hub)


async def test_api_version_is_optional_and_preview_accepted(client: httpx.AsyncClient) -> None:
    assert (await client.put("/devices/v1", json=device_body("v1"))).status_code == 200
    assert (await client.get("/devices/v1?api-version=2020-06-30-preview")).status_code == 200


async def test_bad_if_match(client: httpx.AsyncClient, hub: Hub) -> None:
    await create(client, "im")
    r = await client.put(f"/devices/im{API}", json=device_body("im"), headers={"If-Match": '"a", "b"'})
    assert_error(r, 400, "If-Match")


async def test_unknown_route_and_wrong_method_are_json(client: httpx.AsyncClient) -> None:
    body = assert_error(await client.get(f"/nope{API}"), 404)
    assert body["errorCode"] == "NotFound"
    r = await client.patch(f"/devices/x{API}", json={})
    body = assert_error(r, 405)
    assert body["errorCode"] == "MethodNotAllowed"
    assert "PUT" in r.headers["Allow"]


async def test_unexpected_error_is_500_without_internals(hub: Hub) -> None:
    app = build_app(hub)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail /etc/tether")

    app.router.add_get("/boom", boom)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            r = await c.get("/boom")
    finally:
        await runner.cleanup()
    body = assert_error(r, 500)
    assert body["errorCode"] == "ServerError"
    assert "secret" not in r.text and "RuntimeError" not in r.text


async def test_supplied_keys_are_kept(client: httpx.AsyncClient) -> None:
    key = new_key()
    body = device_body("kk")
    body["authentication"]["symmetricKey"]["primaryKey"] = key
    r = await client.put(f"/devices/kk{API}", json=body)
    assert r.json()["authentication"]["symmetricKey"]["primaryKey"] == key
