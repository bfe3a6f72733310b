"""Fuzz harnesses for the AMQP 1.0 core (registered in `tests/fuzz/run.py`).

Invariants: hostile bytes fed to a server connection (which accepts SASL, every link with credit, and
settles every message) only ever raise ProtocolError, which then sticks; the input buffer never holds
more than one frame beyond what was consumed; the type decoder and the message decoder raise nothing
but ProtocolError; whatever the type decoder accepts re-encodes and decodes to itself."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from tether.protocols.amqp import (
    AMQP_HEADER,
    NEED_DATA,
    SASL_HEADER,
    Accepted,
    AmqpConnection,
    ConnectionConfig,
    CreditChanged,
    LinkAttached,
    MessageReceived,
    ProtocolError,
    SaslCode,
    SaslInitReceived,
    decode_message,
    decode_value,
    encode_values,
)

from .harness import Harness, corpus, fuzz_examples

SEEDS = corpus("amqp")
MAX_FRAME = 4096


def check_stream(case: tuple[bytes, list[int]]) -> None:
    data, chunks = case
    conn = AmqpConnection(ConnectionConfig(max_frame_size=MAX_FRAME, max_pending_bytes=16_384))
    pos = turn = 0
    while pos < len(data):
        step = chunks[turn % len(chunks)]
        conn.receive_data(data[pos: pos + step])
        pos, turn = pos + step, turn + 1
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, SaslInitReceived):
                    conn.sasl_outcome(SaslCode.OK)
                elif isinstance(event, LinkAttached):
                    conn.accept_link(event.link, credit=5, max_message_size=8192)
                elif isinstance(event, MessageReceived):
                    try:
                        decode_message(event.payload)
                    except ProtocolError:
                        pass
                    if not event.settled:
                        conn.settle(event.link, [event.delivery_id], Accepted())
                elif isinstance(event, CreditChanged) and event.link.credit and event.link.attached:
                    conn.send_transfer(event.link, b"\x00\x53\x77\xa1\x02ok", settled=False)
                    conn.finish_drain(event.link)
            conn.data_to_send()
        except ProtocolError as exc:
            conn.close()
            conn.data_to_send()
            try:
                conn.next_event()
            except ProtocolError as again:
                assert again is exc
            else:
                raise AssertionError("a broken connection must stay broken") from None
            return
        assert conn.buffered_bytes < MAX_FRAME + 8


def check_decode(data: bytes) -> None:
    try:
        value, end = decode_value(data)
    except ProtocolError:
        pass
    else:
        assert 0 < end <= len(data)
        again, end2 = decode_value(encode_values(value))
        assert end2 > 0 and repr(again) == repr(value)
    try:
        decode_message(data)
    except ProtocolError:
        pass


def opening(data: bytes) -> bytes:
    """Streams start with a protocol header, as real ones must (other openings are one test each)."""
    return data if data.startswith(b"AMQP") else (SASL_HEADER if len(data) % 2 else AMQP_HEADER) + data


streams = st.tuples(st.binary(max_size=2000).map(opening),
                    st.lists(st.integers(1, 300), min_size=1, max_size=4))

HARNESSES = [
    Harness("amqp.stream", streams, check_stream, seeds=[(seed, [37]) for _, seed in SEEDS]),
    Harness("amqp.decode", st.binary(max_size=500), check_decode, seeds=[seed[8:200] for _, seed in SEEDS]),
]


@pytest.mark.parametrize("harness", HARNESSES, ids=[h.name for h in HARNESSES])
def test_harness_never_crashes(harness: Harness) -> None:
    assert harness.run(fuzz_examples()) >= len(harness.seeds)


def test_corpus_is_present() -> None:
    assert {name for name, _ in SEEDS} >= {"telemetry_sasl_anonymous.bin", "cbs_put_token_plain_header.bin"}
