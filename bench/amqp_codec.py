"""Cost of one AMQP telemetry transfer in Tether's codec and in python-qpid-proton's (C) codec.

Not a test. Usage: python -m bench.amqp_codec [--count 20000]. The transfer is what the Node device SDK
sends: a transfer performative, an empty header, properties (uuid message-id, `to`, correlation-id,
content type and encoding), two application properties and one 200-byte data section.
- decode: frame → transfer performative and message (what the hub does per telemetry message);
- encode: message and transfer → frame bytes (what the hub does per C2D message or event sent).
proton needs the performative through `proton.Data` and the message through `proton.Message`.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import proton

from tether.protocols.amqp import (
    Header,
    Message,
    Properties,
    Symbol,
    Transfer,
    decode_message,
    encode_frame,
)
from tether.protocols.amqp.framing import decode_body, parse_frame_header

BODY = b'{"temperature":21.5,"humidity":40}'.ljust(200, b" ")
MESSAGE_ID = uuid.UUID("7b1f4c84-6f0a-4a1c-9f3e-2a5d4c3b2a19")


def ours_message() -> Message:
    return Message(
        header=Header(),
        properties=Properties(message_id=MESSAGE_ID, to="/devices/dev1/messages/events",
                              correlation_id="corr-1", content_type=Symbol("application/json"),
                              content_encoding=Symbol("utf-8")),
        application_properties={"alert": "high", "zone": "a"},
        body=(BODY,),
    )


def ours_encode() -> bytes:
    transfer = Transfer(handle=0, delivery_id=7, delivery_tag=b"\x00\x00\x00\x07", message_format=0,
                        settled=False)
    return encode_frame(0, transfer, ours_message().encode())


FRAME = ours_encode()


def ours_decode() -> object:
    head = parse_frame_header(FRAME, 0, 1 << 20)
    transfer, payload = decode_body(FRAME[head.body_offset: head.size])
    return transfer, decode_message(payload)


def proton_encode() -> bytes:
    message = proton.Message(body=BODY, id=MESSAGE_ID, address="/devices/dev1/messages/events",
                             correlation_id="corr-1", content_type="application/json",
                             content_encoding="utf-8", properties={"alert": "high", "zone": "a"},
                             inferred=True)
    payload = message.encode()
    data = proton.Data()
    data.put_object(proton.Described(proton.ulong(0x14), [
        proton.uint(0), proton.uint(7), b"\x00\x00\x00\x07", proton.uint(0), False, False, None, None, False,
        False, False]))
    performative = bytes(data.encode())
    size = (8 + len(performative) + len(payload)).to_bytes(4, "big")
    return size + b"\x02\x00\x00\x00" + performative + payload


def proton_decode() -> object:
    head = parse_frame_header(FRAME, 0, 1 << 20)
    body = FRAME[head.body_offset: head.size]
    data = proton.Data()
    used = data.decode(body)
    performative = data.get_object()
    message = proton.Message()
    message.decode(body[used:])
    return performative, message


def per_call_us(fn: Callable[[], object], count: int) -> float:
    for _ in range(min(count, 2000)):
        fn()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    proton_frame = proton_encode()
    head = parse_frame_header(proton_frame, 0, 1 << 20)
    _, payload = decode_body(proton_frame[head.body_offset: head.size])
    assert decode_message(payload).data == BODY  # both codecs speak the same language
    print(f"transfer frame: {len(FRAME)} bytes (proton's: {len(proton_frame)})")
    for name, fn in (("tether decode", ours_decode), ("proton decode", proton_decode),
                     ("tether encode", ours_encode), ("proton encode", proton_encode)):
        print(f"{name:14s} {per_call_us(fn, args.count):6.1f} us per transfer")


if __name__ == "__main__":
    main()
