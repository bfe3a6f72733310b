"""Every HTTPS and AMQP connection state has a deadline (issue 14: connections that finished TLS and then
sent nothing, or half a request, were never closed). Short settings here: TLS handshake, MQTT CONNECT
and the AMQP protocol header / SASL / open 1 s (`connect_timeout_s`), an AMQP credential 4 s (4×),
idle / half a request head 1.5 s (`http_idle_timeout_s`), body 1.5 s between reads
(`http_body_timeout_s`). Each hostile connection must be closed near its deadline — not before most of
it has passed, not long after — while a connection that keeps working stays open."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from hardening.helpers import HOSTNAME, IP, Served, amqp_open, amqp_plain, sasl_init, serving
from tether.protocols.amqp import AMQP_HEADER, SASL_HEADER

CONNECT_S = 1.0
CREDENTIAL_S = 4 * CONNECT_S  # an AMQP connection must hold a credential by then
IDLE_S = 1.5
BODY_S = 1.5
SLACK_S = 3.0  # a busy machine may run a timer late; never early
API = "?api-version=2021-04-12"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    limits = {"connect_timeout_s": CONNECT_S, "http_idle_timeout_s": IDLE_S, "http_body_timeout_s": BODY_S}
    async with serving(tmp_path / "hub", limits=limits) as s:
        yield s


async def closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """(seconds until the hub closed the connection, what it sent); fails if still open at `limit`."""
    started = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await asyncio.wait_for(reader.read(65536), limit):
            data += chunk
    return time.monotonic() - started, data


async def tls_connection(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(IP, served.ports["https"], ssl=served.tls(),
                                         server_hostname="localhost")


def within(waited: float, deadline: float) -> None:
    assert deadline * 0.8 <= waited <= deadline + SLACK_S, (waited, deadline)


@pytest.mark.parametrize("listener", ["https", "amqps"])
async def test_a_tls_handshake_that_never_completes_is_closed(served: Served, listener: str) -> None:
    reader, writer = await asyncio.open_connection(IP, served.ports[listener])
    writer.write(bytes.fromhex("160301020001"))  # the start of a ClientHello, then silence
    waited, _ = await closed_after(reader, CONNECT_S + SLACK_S + 5)
    within(waited, CONNECT_S)
    writer.close()


async def test_a_connection_that_sends_nothing_after_the_handshake_is_closed(served: Served) -> None:
    reader, writer = await tls_connection(served)
    waited, data = await closed_after(reader, IDLE_S + SLACK_S + 5)
    within(waited, IDLE_S)
    assert data == b""
    writer.close()


HALF_HEADS = [b"G", b"GET /healthz HTTP/1.1\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1"]


@pytest.mark.parametrize("head", HALF_HEADS)
async def test_half_a_request_head_is_closed(served: Served, head: bytes) -> None:
    reader, writer = await tls_connection(served)
    writer.write(head)
    waited, data = await closed_after(reader, IDLE_S + SLACK_S + 5)
    within(waited, IDLE_S)
    assert data == b""
    writer.close()


async def test_half_a_body_is_a_408_and_the_connection_closes(served: Served) -> None:
    token = await served.device("meter")
    reader, writer = await tls_connection(served)
    writer.write(f"POST /devices/meter/messages/events{API} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                 f"Content-Length: 100\r\n\r\n0123456789".encode())
    waited, data = await closed_after(reader, 2 * BODY_S + SLACK_S + 5)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert BODY_S * 0.8 <= waited <= 2 * BODY_S + SLACK_S  # 408 at the body deadline, closed after draining
    writer.close()


async def test_an_unread_half_body_does_not_keep_the_connection(served: Served) -> None:
    reader, writer = await tls_connection(served)
    writer.write(f"POST /devices{API} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc".encode())
    waited, data = await closed_after(reader, 2 * BODY_S + SLACK_S + 5)
    assert data.startswith(b"HTTP/1.1 401"), data[:200]  # answered at once (no credential) ...
    assert waited <= BODY_S + SLACK_S  # ... and not held open for the rest of the body
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(served: Served) -> None:
    reader, writer = await tls_connection(served)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'"ok"}'), 10)
    assert first.startswith(b"HTTP/1.1 200")
    waited, _ = await closed_after(reader, IDLE_S + SLACK_S + 5)
    within(waited, IDLE_S)
    writer.close()


async def test_a_connection_that_keeps_working_stays_open(served: Served) -> None:
    reader, writer = await tls_connection(served)
    started = time.monotonic()
    while time.monotonic() - started < 3 * IDLE_S:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b'"ok"}'), 10)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(IDLE_S / 3)
    writer.close()


@pytest.mark.parametrize(("protocol", "sent", "deadline"), [
    pytest.param("mqtt", b"", CONNECT_S, id="mqtt-never-sends-connect"),
    pytest.param("AMQPWSB10", b"", CONNECT_S, id="amqp-never-opens"),
    pytest.param("AMQPWSB10", amqp_open(), CREDENTIAL_S, id="amqp-opens-without-credential"),
])
async def test_a_websocket_is_closed_at_its_protocols_deadline(served: Served, protocol: str, sent: bytes,
                                                               deadline: float) -> None:
    connector = aiohttp.TCPConnector(ssl=served.tls())
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        async with session.ws_connect(f"wss://{IP}:{served.ports['https']}/$iothub/websocket",
                                      protocols=(protocol,)) as ws:
            if sent:
                await ws.send_bytes(sent)
            with contextlib.suppress(asyncio.TimeoutError):
                async for _ in ws:
                    pass
        waited = time.monotonic() - started
    assert ws.closed
    within(waited, deadline)


# --- AMQP over TLS and over WebSockets ------------------------------------------------------------
AMQP_STATES = [  # (what the client sends after the handshake, deadline, what the hub sends before closing)
    pytest.param(b"", CONNECT_S, b"", id="nothing"),
    pytest.param(AMQP_HEADER[:5], CONNECT_S, b"", id="half-a-protocol-header"),
    pytest.param(AMQP_HEADER, CONNECT_S, AMQP_HEADER, id="header-without-open"),
    pytest.param(SASL_HEADER, CONNECT_S, SASL_HEADER, id="sasl-header-without-init"),
    pytest.param(sasl_init("ANONYMOUS"), CONNECT_S, SASL_HEADER, id="sasl-done-without-open"),
    pytest.param(amqp_open()[:20], CONNECT_S, AMQP_HEADER, id="half-an-open"),
    pytest.param(amqp_open(), CREDENTIAL_S, AMQP_HEADER, id="open-without-credential"),
]


async def amqp_connection(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(IP, served.ports["amqps"], ssl=served.tls(),
                                         server_hostname="localhost")


@pytest.mark.parametrize(("sent", "deadline", "answer"), AMQP_STATES)
async def test_every_amqp_connection_state_before_a_credential_is_closed(
        served: Served, sent: bytes, deadline: float, answer: bytes) -> None:
    reader, writer = await amqp_connection(served)
    writer.write(sent)
    waited, data = await closed_after(reader, deadline + SLACK_S + 5)
    within(waited, deadline)
    assert data.startswith(answer), data[:100]
    if deadline == CREDENTIAL_S:
        assert b"amqp:unauthorized-access" in data  # the close says why
    writer.close()


async def test_an_authenticated_amqp_connection_outlives_the_credential_deadline(served: Served) -> None:
    token = await served.device("amqp-meter")
    reader, writer = await amqp_connection(served)
    writer.write(amqp_plain(f"amqp-meter@sas.{HOSTNAME}", token))
    with pytest.raises(TimeoutError):  # no heartbeats asked for, nothing to say: silence, not a close
        await closed_after(reader, CREDENTIAL_S + SLACK_S)
    assert not reader.at_eof()
    writer.close()

