"""The server connection byte by byte: full-length performatives, protocol headers, and every limit
and malformed frame ending in `ProtocolError` with its AMQP condition."""

from __future__ import annotations

import struct

import pytest

from tether.protocols.amqp import (
    AMQP_HEADER,
    NEED_DATA,
    SASL_HEADER,
    Attach,
    Begin,
    Close,
    ConnectionConfig,
    Detach,
    Disposition,
    End,
    Error,
    Flow,
    LinkAttached,
    Open,
    ProtocolError,
    Role,
    Source,
    Target,
    Transfer,
    decode_value,
    encode_frame,
)
from tether.protocols.amqp.connection import AmqpConnection
from tether.protocols.amqp.framing import FRAME_SASL
from tether.protocols.amqp.performatives import (
    Accepted,
    SaslInit,
    SaslMechanisms,
    SaslOutcome,
)

FULL_LENGTH = {Open: 10, Begin: 8, Attach: 14, Flow: 11, Transfer: 11, Disposition: 6, Detach: 3, End: 1,
               Close: 1}
SAMPLES = [Open("c"), Begin(None, 0, 1, 1), Attach("n", 0, False), Flow(None, 1, 0, 1), Transfer(0),
           Disposition(True, 0), Detach(0), End(), Close()]


@pytest.mark.parametrize("performative", SAMPLES, ids=[type(p).__name__ for p in SAMPLES])
def test_every_field_is_encoded_even_the_trailing_nulls(performative: object) -> None:
    wire = performative.encode()  # type: ignore[attr-defined]
    value, _ = decode_value(wire)
    assert len(value.value) == FULL_LENGTH[type(performative)]


def opened(config: ConnectionConfig | None = None) -> AmqpConnection:
    conn = AmqpConnection(config or ConnectionConfig())
    conn.receive_data(AMQP_HEADER + encode_frame(0, Open("client", max_frame_size=100_000))
                      + encode_frame(0, Begin(None, 0, 100, 100)))
    while conn.next_event() is not NEED_DATA:
        pass
    conn.data_to_send()
    return conn


def events(conn: AmqpConnection) -> list[object]:
    seen = []
    while (event := conn.next_event()) is not NEED_DATA:
        seen.append(event)
    return seen


def frames(data: bytes) -> list[object]:
    """Decode our output into performatives (headers skipped)."""
    out, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 4] == b"AMQP":
            pos += 8
            continue
        size, doff = struct.unpack_from(">IB", data, pos)
        body = data[pos + doff * 4: pos + size]
        out.append(decode_value(body)[0].descriptor if body else "heartbeat")
        pos += size
    return out


def test_the_sasl_header_gets_the_four_mechanisms_as_an_array() -> None:
    conn = AmqpConnection()
    conn.receive_data(SASL_HEADER)
    events(conn)
    out = conn.data_to_send()
    assert out[:8] == SASL_HEADER
    mechanisms = decode_value(out[16:])[0]
    assert list(mechanisms.value[0]) == ["MSSBCBS", "ANONYMOUS", "PLAIN", "EXTERNAL"]
    assert mechanisms.value[0].code == 0xA3  # an array of symbols, as uamqp wants
    conn.receive_data(encode_frame(0, SaslInit("MSSBCBS"), frame_type=FRAME_SASL))
    assert events(conn)[0].mechanism == "MSSBCBS"  # type: ignore[attr-defined]


@pytest.mark.parametrize("header", [b"HTTP/1.1", b"AMQP\x02\x01\x00\x00", b"AMQP\x00\x01\x00\x01"])
def test_an_unknown_protocol_header_gets_ours_and_an_error(header: bytes) -> None:
    conn = AmqpConnection()
    conn.receive_data(header)
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "bad-protocol-header"
    assert conn.data_to_send() == AMQP_HEADER
    with pytest.raises(ProtocolError):  # stays broken
        conn.next_event()


def test_sasl_can_be_required() -> None:
    conn = AmqpConnection(ConnectionConfig(allow_plain_header=False))
    conn.receive_data(AMQP_HEADER)
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.data_to_send() == SASL_HEADER


def test_a_failed_sasl_exchange_sends_an_outcome() -> None:
    conn = AmqpConnection()
    conn.receive_data(SASL_HEADER + encode_frame(0, SaslMechanisms(("X",)), frame_type=FRAME_SASL))
    with pytest.raises(ProtocolError):
        events(conn)
    conn.close()
    out = conn.data_to_send()
    assert out.endswith(SaslOutcome(3).encode())


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x00\x00\x00\x04\x02\x00\x00\x00", "bad-frame"),  # size below 8
    (b"\x00\x00\x00\x08\x01\x00\x00\x00", "bad-frame"),  # data offset 1
    (b"\x00\x00\x00\x08\x03\x00\x00\x00", "bad-frame"),  # data offset past the frame
    (b"\x00\x00\x00\x08\x02\x07\x00\x00", "bad-frame"),  # unknown frame type
    (b"\x7f\xff\xff\xff\x02\x00\x00\x00", "frame-too-large"),
    (b"\x00\x00\x00\x0a\x02\x00\x00\x00\x00\x53", "decode-error"),  # truncated performative
    (b"\x00\x00\x00\x0c\x02\x00\x00\x00\xa1\x02hi", "bad-frame"),  # a string is no performative
    (b"\x00\x00\x00\x0b\x02\x00\x00\x00\x00\x53\x99", "decode-error"),
])
def test_malformed_frames_are_protocol_errors(data: bytes, reason: str) -> None:
    conn = AmqpConnection()
    conn.receive_data(AMQP_HEADER + data)
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.reason == reason
    conn.close(Error(info.value.condition))
    assert b"AMQP" in conn.data_to_send()  # header, then open + close with the error


def test_the_first_frame_must_be_open() -> None:
    conn = AmqpConnection()
    conn.receive_data(AMQP_HEADER + encode_frame(0, Begin(None, 0, 1, 1)))
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.condition == "amqp:illegal-state"
    conn.close(Error(info.value.condition))
    assert frames(conn.data_to_send()) == [0x10, 0x18]


def test_channels_above_channel_max_are_refused() -> None:
    conn = opened(ConnectionConfig(channel_max=1))
    conn.receive_data(encode_frame(1, Begin(None, 0, 10, 10)))
    assert events(conn)
    conn.receive_data(encode_frame(2, Begin(None, 0, 10, 10)))
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.reason == "too-many-sessions"


def test_links_are_bounded_per_session_and_per_connection() -> None:
    conn = opened(ConnectionConfig(handle_max=3, max_links=5))
    conn.receive_data(encode_frame(0, Attach("a", 4, False)))
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.reason == "too-many-links"
    conn = opened(ConnectionConfig(handle_max=3, max_links=2))
    conn.receive_data(encode_frame(0, Attach("a", 0, False)) + encode_frame(0, Attach("b", 1, False))
                      + encode_frame(0, Attach("c", 2, False)))
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.condition == "amqp:resource-limit-exceeded"


def test_a_reused_handle_is_an_error() -> None:
    conn = opened()
    conn.receive_data(encode_frame(0, Attach("a", 0, False)) + encode_frame(0, Attach("b", 0, False)))
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.condition == "amqp:session:handle-in-use"


def attached_receiver(credit: int = 10, config: ConnectionConfig | None = None
                      ) -> tuple[AmqpConnection, object]:
    conn = opened(config)
    conn.receive_data(encode_frame(0, Attach("tx", 0, False, target=Target("t"), source=Source("s"),
                                             initial_delivery_count=0)))
    (event,) = events(conn)
    assert isinstance(event, LinkAttached) and event.link.role is Role.RECEIVER
    conn.accept_link(event.link, credit=credit)
    conn.data_to_send()
    return conn, event.link


def test_a_transfer_without_credit_is_refused() -> None:
    conn, _ = attached_receiver(credit=1)
    transfer = encode_frame(0, Transfer(0, 0, b"t", 0, False), b"\x00\x53\x75\xa0\x01x")
    conn.receive_data(transfer)
    assert len(events(conn)) == 1  # unsettled: its credit comes back only once we settle it
    conn.receive_data(encode_frame(0, Transfer(0, 1, b"u", 0, False), b"\x00\x53\x75\xa0\x01x"))
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.condition == "amqp:link:transfer-limit-exceeded"


def test_the_session_window_is_reopened_as_transfers_arrive() -> None:
    conn, _ = attached_receiver(credit=1000, config=ConnectionConfig(incoming_window=4))
    body = b"\x00\x53\x75\xa0\x01x"
    conn.receive_data(b"".join(encode_frame(0, Transfer(0, i, b"t", 0, True, more=True), body)
                               for i in range(4)))
    events(conn)
    out = conn.data_to_send()
    assert 0x13 in frames(out)  # a session flow reopened the window at half
    session = next(iter(conn.sessions.values()))
    assert session.incoming_window >= 2 and session.next_incoming_id == 1  # one delivery, four frames


def test_unfinished_deliveries_are_bounded_across_links() -> None:
    conn, _ = attached_receiver(config=ConnectionConfig(max_pending_bytes=10_000))
    chunk = encode_frame(0, Transfer(0, 0, b"t", 0, False, more=True), b"y" * 4000)
    conn.receive_data(chunk * 3)
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.reason == "pending-bytes"


def test_settling_consecutive_deliveries_sends_ranges() -> None:
    conn, link = attached_receiver()
    payload = b"\x00\x53\x75\xa0\x01x"
    conn.receive_data(b"".join(encode_frame(0, Transfer(0, i, bytes([i]), 0, False), payload)
                               for i in range(5)))
    assert len(events(conn)) == 5
    conn.settle(link, [0, 1, 2, 4], Accepted())  # type: ignore[arg-type]
    out = conn.data_to_send()
    dispositions = []
    pos = 0
    while pos < len(out):
        size = struct.unpack_from(">I", out, pos)[0]
        value = decode_value(out[pos + 8: pos + size])[0]
        if value.descriptor == 0x15:
            dispositions.append((value.value[1], value.value[2]))
        pos += size
    assert dispositions == [(0, 2), (4, 4)]


def test_aborted_deliveries_are_dropped() -> None:
    conn, _ = attached_receiver()
    conn.receive_data(encode_frame(0, Transfer(0, 0, b"t", 0, False, more=True), b"part")
                      + encode_frame(0, Transfer(0, aborted=True)))
    assert events(conn) == []
    conn.receive_data(encode_frame(0, Transfer(0, 1, b"u", 0, True), b"\x00\x53\x75\xa0\x01x"))
    (event,) = events(conn)
    assert event.payload == b"\x00\x53\x75\xa0\x01x"  # type: ignore[attr-defined]
