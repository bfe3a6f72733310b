"""Our server connection against python-qpid-proton's client engine, in memory: SASL and plain
openings, messages both ways (one frame and many), credit, dispositions, refusals, drain, detach, end,
close, heartbeats. Proton is an independent AMQP 1.0 implementation: it accepts what we send."""

from __future__ import annotations

import proton
import pytest

from tether.protocols.amqp import (
    Accepted,
    AmqpConnection,
    ConnectionClosed,
    ConnectionConfig,
    CreditChanged,
    DeliveryUpdated,
    Error,
    Event,
    LinkAttached,
    LinkDetached,
    LinkError,
    Message,
    MessageReceived,
    Opened,
    Properties,
    ProtocolError,
    ProtocolHeaderReceived,
    Rejected,
    Role,
    SaslCode,
    SaslInitReceived,
    SessionEnded,
    Symbol,
    decode_message,
)

from .proton_peer import ProtonPeer


def of(peer: ProtonPeer, kind: type) -> list[Event]:
    return [e for e in peer.events if isinstance(e, kind)]


def test_sasl_anonymous_then_open() -> None:
    peer = ProtonPeer()
    peer.open_session()
    peer.pump()
    assert of(peer, ProtocolHeaderReceived) == [ProtocolHeaderReceived(True), ProtocolHeaderReceived(False)]
    init = of(peer, SaslInitReceived)[0]
    assert isinstance(init, SaslInitReceived) and init.mechanism == "ANONYMOUS"
    opened = of(peer, Opened)[0]
    assert isinstance(opened, Opened) and opened.open.container_id == "proton-client"
    assert peer.connection.remote_container == "tether"
    assert peer.transport.remote_max_frame_size == 65536


def test_sasl_plain_hands_the_credentials_to_the_caller() -> None:
    peer = ProtonPeer(sasl="PLAIN", user="dev1@sas.hub", password="SharedAccessSignature sr=x")
    peer.open_session()
    peer.pump()
    init = of(peer, SaslInitReceived)[0]
    assert isinstance(init, SaslInitReceived)
    assert init.mechanism == "PLAIN"
    assert init.initial_response == b"\x00dev1@sas.hub\x00SharedAccessSignature sr=x"


def test_a_refused_sasl_outcome_ends_the_connection() -> None:
    peer = ProtonPeer(sasl="PLAIN", user="u", password="p")

    def refuse(event: Event) -> None:
        if isinstance(event, SaslInitReceived):
            peer.server.sasl_outcome(SaslCode.AUTH)

    peer.on_event = refuse
    peer.open_session()
    peer.pump()
    assert peer.server.closed
    assert peer.transport.sasl().outcome == proton.SASL.AUTH


def test_a_client_without_sasl_opens_with_the_plain_header() -> None:
    peer = ProtonPeer(sasl=None)
    peer.open_session()
    peer.pump()
    assert of(peer, ProtocolHeaderReceived) == [ProtocolHeaderReceived(False)]
    assert of(peer, Opened)


def test_messages_from_the_client_are_reassembled_and_settled() -> None:
    peer = ProtonPeer(max_frame_size=4096)
    session = peer.open_session()
    sender = session.sender("telemetry")
    sender.target.address = "/devices/d1/messages/events"
    sender.open()
    peer.pump()
    assert sender.credit == 100
    small = proton.Message(body=b"hi", id="m1", properties={"k": "v"}, content_type="application/json")
    small.send(sender, tag=b"1")
    large = proton.Message(body=b"x" * 200_000, id=proton.uuid.uuid4() if hasattr(proton, "uuid") else "m2")
    large.send(sender, tag=b"2")
    peer.on_event = lambda e: (peer.server.settle(e.link, [e.delivery_id], Accepted())
                               if isinstance(e, MessageReceived) else None)
    peer.pump()
    received = of(peer, MessageReceived)
    assert len(received) == 2
    first = received[0]
    assert isinstance(first, MessageReceived) and not first.settled and first.delivery_tag == b"1"
    message = decode_message(first.payload)
    assert message.properties is not None and message.properties.message_id == "m1"
    assert message.properties.content_type == "application/json"
    assert message.application_properties == {"k": "v"}
    second = received[1]
    assert isinstance(second, MessageReceived) and len(decode_message(second.payload).body.value) == 200_000
    states = [e.delivery for e in peer.proton_events() if e.type == proton.Event.DELIVERY]
    assert states and all(d.remote_state == proton.Delivery.ACCEPTED and d.settled for d in states)


def test_credit_is_topped_up_as_deliveries_are_settled() -> None:
    peer = ProtonPeer()
    peer.credit = 4
    session = peer.open_session()
    sender = session.sender("s")
    sender.target.address = "t"
    sender.open()
    peer.pump()
    held: list[MessageReceived] = []
    peer.on_event = lambda e: held.append(e) if isinstance(e, MessageReceived) else None
    for i in range(4):
        proton.Message(body=str(i)).send(sender, tag=str(i).encode())
    peer.pump()
    assert len(held) == 4 and sender.credit == 0
    peer.server.settle(held[0].link, [m.delivery_id for m in held], Accepted())
    peer.pump()
    assert sender.credit == 4


def test_sending_to_a_proton_receiver_in_one_frame_and_in_many() -> None:
    peer = ProtonPeer(max_frame_size=1024)
    session = peer.open_session()
    receiver = session.receiver("c2d")
    receiver.source.address = "/devices/d1/messages/devicebound"
    receiver.open()
    peer.pump()
    link = of(peer, LinkAttached)[0].link  # type: ignore[attr-defined]
    assert link.role is Role.SENDER and link.address == "/devices/d1/messages/devicebound"
    receiver.flow(5)
    peer.pump()
    assert of(peer, CreditChanged) and link.credit == 5
    server = peer.server
    small = Message(properties=Properties(message_id="c1", to="/devices/d1"),
                    application_properties={"a": "b"}, body=(b"payload",))
    server.send_transfer(link, small.encode(), settled=False)
    server.send_transfer(link, Message(body=(b"y" * 5000,)).encode(), settled=False)
    peer.pump()
    got = []
    for event in peer.proton_events():
        if event.type == proton.Event.DELIVERY and not event.delivery.partial:
            delivery = event.delivery
            message = proton.Message()
            message.decode(receiver.recv(delivery.pending))
            got.append(message)
            delivery.update(proton.Delivery.ACCEPTED)
            delivery.settle()
    assert [m.id for m in got] == ["c1", None]
    assert got[0].properties == {"a": "b"} and bytes(got[0].body) == b"payload"
    assert len(bytes(got[1].body)) == 5000
    peer.pump()
    updates = of(peer, DeliveryUpdated)
    assert len(updates) == 2
    assert all(isinstance(u, DeliveryUpdated) and isinstance(u.state, Accepted) and u.settled
               for u in updates)
    assert link.credit == 3 and not link.session.unsettled_out


def test_a_refused_link_reaches_the_client_with_its_error() -> None:
    peer = ProtonPeer()
    peer.on_event = lambda e: (peer.server.refuse_link(e.link, Error("amqp:unauthorized-access", "not yours"))
                               if isinstance(e, LinkAttached) else peer.default_handler(e))
    session = peer.open_session()
    sender = session.sender("x")
    sender.target.address = "/devices/other/messages/events"
    sender.open()
    peer.pump()
    assert sender.remote_condition is not None
    assert sender.remote_condition.name == "amqp:unauthorized-access"
    assert sender.remote_condition.description == "not yours"
    sender.close()
    peer.pump()
    assert peer.server.link_count == 0


def test_drain_uses_up_the_credit_and_tells_the_client() -> None:
    peer = ProtonPeer()
    session = peer.open_session()
    receiver = session.receiver("r")
    receiver.source.address = "q"
    receiver.open()
    peer.pump()
    link = of(peer, LinkAttached)[0].link  # type: ignore[attr-defined]
    receiver.drain(7)
    peer.pump()
    assert link.drain and link.credit == 7
    peer.server.finish_drain(link)
    peer.pump()
    assert receiver.credit == 0 and receiver.draining() is False


def test_detach_end_and_close_are_echoed() -> None:
    peer = ProtonPeer()
    session = peer.open_session()
    sender = session.sender("s")
    sender.target.address = "t"
    sender.open()
    peer.pump()
    sender.close()
    peer.pump()
    assert of(peer, LinkDetached) and sender.state & proton.Endpoint.REMOTE_CLOSED
    second = session.receiver("r")
    second.source.address = "q"
    second.open()
    peer.pump()
    session.close()
    peer.pump()
    assert of(peer, SessionEnded) and session.state & proton.Endpoint.REMOTE_CLOSED
    assert len(of(peer, LinkDetached)) == 2 and peer.server.link_count == 0
    peer.connection.close()
    peer.pump()
    assert of(peer, ConnectionClosed) and peer.server.closed
    assert peer.connection.state & proton.Endpoint.REMOTE_CLOSED


def test_a_message_over_the_links_limit_detaches_that_link_only() -> None:
    peer = ProtonPeer()
    peer.on_event = lambda e: (peer.server.accept_link(e.link, credit=10, max_message_size=1000)
                               if isinstance(e, LinkAttached) else peer.default_handler(e))
    session = peer.open_session()
    big, ok = session.sender("big"), session.sender("ok")
    for s in (big, ok):
        s.target.address = "t"
        s.open()
    peer.pump()
    proton.Message(body=b"z" * 5000).send(big, tag=b"1")
    peer.pump()
    errors = of(peer, LinkError)
    assert len(errors) == 1 and errors[0].error.condition == "amqp:link:message-size-exceeded"  # type: ignore[attr-defined]
    assert big.remote_condition is not None and big.remote_condition.name == "amqp:link:message-size-exceeded"
    proton.Message(body=b"small").send(ok, tag=b"2")
    peer.pump()
    assert of(peer, MessageReceived)


def test_heartbeats_keep_a_quiet_connection_alive_and_silence_ends_it() -> None:
    server = AmqpConnection(ConnectionConfig(idle_time_out_ms=10_000))
    peer = ProtonPeer(server, idle_timeout_s=4.0)
    peer.open_session()
    peer.pump()
    server.tick(100.0)
    assert server.tick(101.0) == 102.0  # heartbeat due at half the client's 4 s
    server.tick(102.5)
    assert server.data_to_send() == b"\x00\x00\x00\x08\x02\x00\x00\x00"
    with pytest.raises(ProtocolError) as info:
        server.tick(111.0)
    assert info.value.condition == "amqp:resource-limit-exceeded"
    server.close(Error(info.value.condition, info.value.description))
    peer.transport.push(server.data_to_send())
    assert peer.connection.remote_condition is not None
    assert peer.connection.remote_condition.name == "amqp:resource-limit-exceeded"


def test_rejected_with_an_error_reaches_the_client() -> None:
    peer = ProtonPeer()
    reject = Rejected(Error(Symbol("amqp:not-found"), "no such device"))
    peer.on_event = lambda e: (peer.server.settle(e.link, [e.delivery_id], reject)
                               if isinstance(e, MessageReceived) else peer.default_handler(e))
    session = peer.open_session()
    sender = session.sender("s")
    sender.target.address = "/messages/devicebound"
    sender.open()
    peer.pump()
    proton.Message(body=b"c2d").send(sender, tag=b"1")
    peer.pump()
    deliveries = [e.delivery for e in peer.proton_events() if e.type == proton.Event.DELIVERY]
    assert deliveries[-1].remote_state == proton.Delivery.REJECTED
    assert deliveries[-1].remote.condition.name == "amqp:not-found"
