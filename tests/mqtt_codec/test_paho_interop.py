"""A real MQTT client (paho-mqtt 1.6.1, the library inside azure-iot-device) against the codec.

A tiny asyncio server on an ephemeral loopback port answers with the codec and records every byte
paho sends, so the seed corpus is proven to be what a real client puts on the wire.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from tether.protocols.mqtt import (
    NEED_DATA,
    ConnAck,
    Connect,
    Disconnect,
    MqttConnection,
    Packet,
    ProtocolError,
    Publish,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    encode_puback,
)

CORPUS = Path(__file__).parents[1] / "fuzz" / "corpus" / "mqtt"
USERNAME = "localhost/dev1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0"
PASSWORD = (
    "SharedAccessSignature sr=localhost%2Fdevices%2Fdev1"
    "&sig=VVWqmxbPMUEIbKav5a2cJpYL9j38xff0E1wt%2FMsscy8%3D&se=1795392981"
)
TELEMETRY = (
    "devices/dev1/messages/events/%24.mid=msg-1&%24.cid=corr-1&%24.ct=application%2Fjson"
    "&%24.ce=utf-8&alert=high%20temp&zone=a%2Fb"
)


class Recorder:
    """Serves one connection with the codec; keeps raw bytes, packets and the refusal, if any."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.packets: list[Packet] = []
        self.error: ProtocolError | None = None
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = MqttConnection("server")
        try:
            while data := await reader.read(65536):
                self.raw += data
                conn.receive_data(data)
                try:
                    while (packet := conn.next_event()) is not NEED_DATA:
                        self.packets.append(packet)
                        writer.write(self.reply(conn, packet))
                except ProtocolError as exc:
                    self.error = exc
                    if exc.connack_code is not None:
                        writer.write(conn.send(ConnAck(False, exc.connack_code)))
                    break
                await writer.drain()
        finally:
            writer.close()
            self.done.set()

    @staticmethod
    def reply(conn: MqttConnection, packet: Packet) -> bytes:
        if isinstance(packet, Connect):
            return conn.send(ConnAck())
        if isinstance(packet, Publish) and packet.packet_id is not None:
            return encode_puback(packet.packet_id)
        if isinstance(packet, Subscribe):
            return conn.send(SubAck(packet.packet_id, tuple(q for _, q in packet.topics)))
        if isinstance(packet, Unsubscribe):
            return conn.send(UnsubAck(packet.packet_id))
        return b""


async def run_paho(make: Callable[[], mqtt.Client], act: Callable[[mqtt.Client], None]) -> Recorder:
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def client() -> None:
        paho = make()
        answered = threading.Event()  # any CONNACK, or the server closing on us
        paho.on_connect = lambda *_: answered.set()
        paho.on_disconnect = lambda *_: answered.set()
        paho.connect("127.0.0.1", port, keepalive=60)
        paho.loop_start()
        try:
            answered.wait(5)
            act(paho)
        finally:
            paho.disconnect()
            paho.loop_stop()

    async with server:
        await asyncio.to_thread(client)
        await asyncio.wait_for(recorder.done.wait(), 10)
    return recorder


def split_packets(stream: bytes) -> list[bytes]:
    """Cut a byte stream at packet boundaries (no validation: just the length fields)."""
    out, i = [], 0
    while i < len(stream):
        j, length, shift = i + 1, 0, 0
        while True:
            length |= (stream[j] & 0x7F) << shift
            shift += 7
            j += 1
            if not stream[j - 1] & 0x80:
                break
        out.append(stream[i : j + length])
        i = j + length
    return out


async def test_azure_style_paho_session_matches_the_corpus_byte_for_byte() -> None:
    def make() -> mqtt.Client:
        paho = mqtt.Client(client_id="dev1", clean_session=False, protocol=mqtt.MQTTv311)
        paho.username_pw_set(USERNAME, PASSWORD)
        return paho

    def act(paho: mqtt.Client) -> None:
        paho.subscribe("devices/dev1/messages/devicebound/#", qos=1)
        paho.subscribe([("$iothub/twin/res/#", 1), ("$iothub/methods/POST/#", 1)])
        paho.publish(TELEMETRY, b'{"t":21.5}', qos=1).wait_for_publish(5)
        paho.publish("$iothub/twin/GET/?$rid=1", b" ", qos=1).wait_for_publish(5)
        paho.unsubscribe("$iothub/methods/POST/#")
        time.sleep(0.2)

    recorder = await run_paho(make, act)
    assert recorder.error is None
    assert recorder.packets == [
        Connect("dev1", USERNAME, PASSWORD.encode(), 60, False),
        Subscribe(1, (("devices/dev1/messages/devicebound/#", 1),)),
        Subscribe(2, (("$iothub/twin/res/#", 1), ("$iothub/methods/POST/#", 1))),
        Publish(TELEMETRY, b'{"t":21.5}', 1, packet_id=3),
        Publish("$iothub/twin/GET/?$rid=1", b" ", 1, packet_id=4),
        Unsubscribe(5, ("$iothub/methods/POST/#",)),
        Disconnect(),
    ]
    names = [
        "connect_azure_sdk",
        "subscribe_c2d",
        "subscribe_twin_methods",
        "publish_telemetry_qos1",
        "publish_twin_get",
        "unsubscribe",
        "disconnect",
    ]
    packets = split_packets(bytes(recorder.raw))
    assert packets == [(CORPUS / f"{name}.bin").read_bytes() for name in names]


async def test_paho_mqtt5_connect_gets_connack_unacceptable_protocol_version() -> None:
    recorder = await run_paho(lambda: mqtt.Client(client_id="dev5", protocol=mqtt.MQTTv5), lambda paho: None)
    assert recorder.error is not None and recorder.error.connack_code == 0x01
    assert recorder.packets == []
    assert split_packets(bytes(recorder.raw))[0] == (CORPUS / "connect_mqtt5.bin").read_bytes()


async def test_paho_mqtt31_connect_gets_connack_unacceptable_protocol_version() -> None:
    recorder = await run_paho(lambda: mqtt.Client(client_id="dev3", protocol=mqtt.MQTTv31), lambda paho: None)
    assert recorder.error is not None and recorder.error.connack_code == 0x01
    assert split_packets(bytes(recorder.raw))[0] == (CORPUS / "connect_mqtt31.bin").read_bytes()
