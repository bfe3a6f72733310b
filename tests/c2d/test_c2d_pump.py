"""C2D delivery (`messaging.c2d_delivery`): complete on the device's acknowledgement, reject and
abandon when the device settles so (AMQP), abandon on a dropped connection, offline messages
delivered on subscribe — driven through a test-controlled `deliver`; MQTT topics the Azure device SDK
understands; and end to end through the real MQTT server with a paho client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from azure.iot.device.iothub.models import Message  # type: ignore[import-untyped]
from azure.iot.device.iothub.pipeline.mqtt_topic_iothub import (  # type: ignore[import-untyped]
    extract_message_properties_from_topic,
)

from c2d.helpers import HOST, create_device, device_token, running_hub
from tether.hub import Hub
from tether.messaging.c2d import C2DMessage, C2DOutcome, C2DService
from tether.messaging.c2d_delivery import C2DPump, C2DPumps
from tether.messaging.device_sessions import DeviceSessions
from tether.messaging.methods import MethodService
from tether.messaging.presence import ConnectionRegistry
from tether.messaging.twins import TwinService
from tether.protocols.mqtt.devicebound import c2d_message_topic
from tether.protocols.mqtt.server import start_mqtt, stop_mqtt
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.security.principal import CredentialKind, Principal, PrincipalKind
from tether.storage.sql import SqlStorage
from tether.storage.sql.twins import SqlTwinRepository

ACTOR = "policy:service"


class FakeLink:
    """The device side of `deliver`: records every delivery; the test settles each one (True: the
    device acknowledged it, False: the connection dropped first, or a `C2DOutcome`)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []  # (message id, body)
        self.acks: list[asyncio.Future[bool | C2DOutcome]] = []
        self.arrived = asyncio.Event()

    async def deliver(self, message: C2DMessage) -> C2DOutcome:
        done: asyncio.Future[bool | C2DOutcome] = asyncio.get_running_loop().create_future()
        self.published.append((message.message_id, message.body))
        self.acks.append(done)
        self.arrived.set()
        outcome = await done
        if outcome is False:
            raise ConnectionError("closed")
        return C2DOutcome.COMPLETE if outcome is True else outcome

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        async def enough() -> None:
            while len(self.published) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)


@pytest.fixture
async def c2d(storage: SqlStorage, registry: RegistryService) -> AsyncIterator[C2DService]:
    await create_device(registry, "dev1")
    service = C2DService(storage.db)
    yield service
    await service.close()


async def eventually(check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_topic_is_read_back_by_the_azure_device_sdk(c2d: C2DService) -> None:
    await c2d.send("dev1", b"{}", message_id="m1", correlation_id="c/1", ack="full", user_id="u1",
                   content_type="application/json", content_encoding="utf-8",
                   properties={"alert": "high temp", "zone": "a/b&c=d"}, actor=ACTOR)
    got = await c2d.receive("dev1")
    assert got is not None
    topic = c2d_message_topic(got)
    assert topic.startswith("devices/dev1/messages/devicebound/%24.mid=m1&")
    message = Message(b"{}")
    extract_message_properties_from_topic(topic, message)
    assert (message.message_id, message.correlation_id, message.user_id) == ("m1", "c/1", "u1")
    assert (message.content_type, message.content_encoding) == ("application/json", "utf-8")
    assert message.ack == "full"
    assert message.custom_properties == {"alert": "high temp", "zone": "a/b&c=d"}
    assert message.expiry_time_utc.endswith("Z")


async def test_offline_messages_go_out_in_order_and_complete_on_puback(c2d: C2DService) -> None:
    for i in range(3):
        await c2d.send("dev1", b"%d" % i, message_id=f"m{i}", actor=ACTOR)
    link = FakeLink()
    pump = C2DPump(c2d, "dev1", link.deliver, max_in_flight=2)
    pump.start()
    try:
        await link.wait_for(2)
        await asyncio.sleep(0.05)
        assert len(link.published) == 2  # no more than max_in_flight unacknowledged
        for ack in list(link.acks):
            ack.set_result(True)
        await link.wait_for(3)
        link.acks[2].set_result(True)
        assert [p for _, p in link.published] == [b"0", b"1", b"2"]
        await eventually(lambda: _depth_is(c2d, 0))
        await c2d.send("dev1", b"live", actor=ACTOR)  # wakes the idle pump
        await link.wait_for(4)
        link.acks[3].set_result(True)
        await eventually(lambda: _depth_is(c2d, 0))
    finally:
        await pump.stop()


async def _depth_is(c2d: C2DService, depth: int) -> bool:
    return await c2d.queue_depth("dev1") == depth


async def test_dropped_connection_abandons_and_the_next_pump_redelivers(c2d: C2DService) -> None:
    await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    link = FakeLink()
    pump = C2DPump(c2d, "dev1", link.deliver)
    pump.start()
    await link.wait_for(1)
    link.acks[0].set_result(False)  # connection dropped before the PUBACK
    await eventually(lambda: _not_running(pump))
    await pump.stop()

    again = FakeLink()
    pump = C2DPump(c2d, "dev1", again.deliver)
    pump.start()
    try:
        await again.wait_for(1)
        got = await c2d.repo.peek("dev1")
        assert got[0].message_id == "m1" and got[0].delivery_count == 2  # as Azure counts it
        again.acks[0].set_result(True)
        await eventually(lambda: _depth_is(c2d, 0))
    finally:
        await pump.stop()


async def test_a_device_abandon_redelivers_on_the_same_connection(c2d: C2DService) -> None:
    await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    link = FakeLink()
    pump = C2DPump(c2d, "dev1", link.deliver)
    pump.start()
    try:
        await link.wait_for(1)
        link.acks[0].set_result(C2DOutcome.ABANDON)  # AMQP `released`: the connection stays up
        await link.wait_for(2)
        assert link.published[1][0] == "m1" and pump.running
        assert (await c2d.repo.peek("dev1"))[0].delivery_count == 2
        link.acks[1].set_result(True)
        await eventually(lambda: _depth_is(c2d, 0))
    finally:
        await pump.stop()


async def _not_running(pump: C2DPump) -> bool:
    return not pump.running


async def test_stop_abandons_unacknowledged_deliveries(c2d: C2DService) -> None:
    await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    link = FakeLink()
    pump = C2DPump(c2d, "dev1", link.deliver)
    pump.start()
    await link.wait_for(1)
    await pump.stop()
    rows = await c2d.repo.peek("dev1")
    assert rows[0].lock_token is None and rows[0].delivery_count == 1
    got = await c2d.receive("dev1")
    assert got is not None and got.message_id == "m1"


# --- end to end: real MQTT server, paho client --------------------------------------------------


class PahoDevice:
    def __init__(self, port: int, device_id: str, token: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.got = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(client_id=device_id, clean_session=False, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(f"{HOST}/{device_id}/?api-version=2021-04-12", token)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.append(message)
        self.got.set()

    async def wait_messages(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"got {len(self.messages)} of {count} messages"
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def mqtt_hub(tmp_path: Path, sqlite_url: str) -> AsyncIterator[tuple[Hub, int, C2DPumps]]:
    async with running_hub(tmp_path, sqlite_url) as hub:
        service: C2DService = hub.c2d  # type: ignore[attr-defined]  # running_hub's, with a fast sweeper
        pumps = C2DPumps(service)
        hub.device_sessions = DeviceSessions(  # type: ignore[attr-defined]
            connections=hub.connections, twins=hub.twins, methods=hub.methods, c2d_pumps=pumps,
            registry=hub.registry)
        server = await start_mqtt(hub, host="127.0.0.1", port=0, tls=False)
        try:
            yield hub, server.sockets[0].getsockname()[1], pumps
        finally:
            server.close()
            await pumps.close()
            await stop_mqtt(hub)


async def test_paho_device_gets_offline_and_live_messages(mqtt_hub: tuple[Hub, int, C2DPumps]) -> None:
    hub, port, pumps = mqtt_hub
    c2d: C2DService = hub.c2d  # type: ignore[attr-defined]
    device = await create_device(hub.registry, "dev1")
    await c2d.send("dev1", b"while offline", message_id="m1", ack="positive",
                   properties={"zone": "a/b"}, actor=ACTOR)
    paho = await asyncio.to_thread(PahoDevice, port, "dev1", device_token(device))
    try:
        paho.client.subscribe("devices/dev1/messages/devicebound/#", qos=1)
        await paho.wait_messages(1)
        first = paho.messages[0]
        assert first.payload == b"while offline" and first.qos == 1
        message = Message(first.payload)
        extract_message_properties_from_topic(first.topic, message)
        assert message.message_id == "m1" and message.custom_properties == {"zone": "a/b"}
        await eventually(lambda: _depth_is(c2d, 0))  # paho PUBACKed: completed
        batch = await c2d.feedback.receive(timeout_s=3)
        assert batch is not None and [r.status_code for r in batch.records] == ["Success"]

        await c2d.send("dev1", b"live", message_id="m2", actor=ACTOR)
        await paho.wait_messages(2)
        assert paho.messages[1].payload == b"live"
        await eventually(lambda: _depth_is(c2d, 0))
    finally:
        await asyncio.to_thread(paho.close)
    await eventually(lambda: _pumps_empty(pumps))  # the pump stops with the connection


async def _pumps_empty(pumps: C2DPumps) -> bool:
    return len(pumps) == 0


# --- device sessions: one pump per connection, resumed on a persistent reconnect -------------------


class FakeHandle:
    """A live connection as a protocol presents it (`ConnectionHandle`), acknowledging at once;
    `family` "amqp" stands for a second protocol."""

    protocol = "mqtt"

    def __init__(self, family: str = "mqtt", outcome: C2DOutcome = C2DOutcome.COMPLETE) -> None:
        self.family = family
        self.outcome = outcome
        self.topics: list[str] = []
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def close(self, reason: str) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def send_desired_patch(self, patch: bytes, version: int) -> None:
        self.topics.append(f"desired/{version}")

    async def send_method_request(self, method_name: str, rid: str, payload: bytes) -> None:
        self.topics.append(f"method/{method_name}")

    async def send_c2d(self, message: C2DMessage) -> C2DOutcome:
        if self.closed:
            raise ConnectionError("closed")
        self.topics.append(c2d_message_topic(message))
        return self.outcome


DEVICE = Principal(kind=PrincipalKind.device, credential=CredentialKind.device_key, device_id="dev1")


@pytest.fixture
async def sessions(c2d: C2DService, storage: SqlStorage, registry: RegistryService,
                   audit: AuditLog) -> AsyncIterator[DeviceSessions]:
    connections = ConnectionRegistry(10)
    pumps = C2DPumps(c2d)
    methods = MethodService(connections, registry=registry)
    twins = TwinService(SqlTwinRepository(storage.db), registry, audit)
    yield DeviceSessions(connections=connections, twins=twins, methods=methods, c2d_pumps=pumps,
                         registry=registry)
    await pumps.close()


async def test_reconnect_without_resubscribe_resumes_delivery(
        c2d: C2DService, sessions: DeviceSessions) -> None:
    pumps = sessions.c2d_pumps
    first = FakeHandle()
    await sessions.connected(DEVICE, first, persistent=True)
    assert len(pumps) == 0  # never subscribed: nothing to resume
    await sessions.subscribed(DEVICE, first, ["c2d"])
    await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    await eventually(lambda: _delivered(first, 1))
    await first.close("peer-closed")
    await eventually(lambda: _pumps_empty(pumps))

    await c2d.send("dev1", b"x", message_id="m2", actor=ACTOR)
    second = FakeHandle()
    await sessions.connected(DEVICE, second, persistent=True)  # the SDK does not subscribe again
    await eventually(lambda: _delivered(second, 1))
    assert "m2" in second.topics[0]
    await eventually(lambda: _depth_is(c2d, 0))

    await second.close("peer-closed")
    await c2d.send("dev1", b"x", message_id="m3", actor=ACTOR)
    third = FakeHandle()
    await sessions.connected(DEVICE, third, persistent=False)  # a clean session forgets it
    await asyncio.sleep(0.1)
    assert third.topics == [] and await c2d.queue_depth("dev1") == 1


async def test_a_session_is_not_resumed_by_another_protocol_or_after_a_non_persistent_one(
        c2d: C2DService, sessions: DeviceSessions) -> None:
    mqtt = FakeHandle()
    await sessions.connected(DEVICE, mqtt, persistent=True)
    await sessions.subscribed(DEVICE, mqtt, ["c2d", "methods", "desired-patches"])
    await mqtt.close("peer-closed")
    amqp = FakeHandle("amqp")  # AMQP has no persistent sessions: it attaches its links again
    await sessions.connected(DEVICE, amqp, persistent=False)
    assert sessions.subscriptions("dev1") == frozenset() and sessions.methods.online("dev1") is None
    await sessions.subscribed(DEVICE, amqp, ["c2d"])
    await amqp.close("peer-closed")
    await eventually(lambda: _pumps_empty(sessions.c2d_pumps))

    await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    again = FakeHandle()  # an MQTT reconnect asking for its persistent session: the AMQP one is gone
    await sessions.connected(DEVICE, again, persistent=True)
    await asyncio.sleep(0.1)
    assert again.topics == [] and len(sessions.c2d_pumps) == 0


async def test_unsubscribing_c2d_stops_delivery_and_a_device_settlement_is_kept(
        c2d: C2DService, sessions: DeviceSessions) -> None:
    amqp = FakeHandle("amqp", outcome=C2DOutcome.REJECT)  # an AMQP device rejecting what it gets
    await sessions.connected(DEVICE, amqp, persistent=False)
    await sessions.subscribed(DEVICE, amqp, ["c2d"])
    await c2d.send("dev1", b"x", message_id="m1", ack="negative", actor=ACTOR)
    await eventually(lambda: _delivered(amqp, 1))
    batch = await c2d.feedback.receive(timeout_s=3)
    assert batch is not None and [r.status_code for r in batch.records] == ["Rejected"]
    await sessions.unsubscribed(DEVICE, amqp, ["c2d"])  # the receiver link detached
    assert len(sessions.c2d_pumps) == 0 and "c2d" not in sessions.subscriptions("dev1")
    await c2d.send("dev1", b"x", message_id="m2", actor=ACTOR)
    await asyncio.sleep(0.1)
    assert len(amqp.topics) == 1 and await c2d.queue_depth("dev1") == 1


async def _delivered(handle: FakeHandle, count: int) -> bool:
    return len(handle.topics) >= count
