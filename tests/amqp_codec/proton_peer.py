"""python-qpid-proton's engine as an in-memory AMQP client against our sans-I/O server connection:
bytes move between `proton.Transport` and `AmqpConnection` without sockets, so every exchange is
checked against an independent implementation of AMQP 1.0 (the test oracle)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import proton

from tether.protocols.amqp import (
    NEED_DATA,
    AmqpConnection,
    ConnectionConfig,
    Event,
    LinkAttached,
    SaslCode,
    SaslInitReceived,
)


class ProtonPeer:
    """A proton client connection wired to an `AmqpConnection`; `pump()` moves bytes both ways and
    hands every server event to `on_event` (default: accept SASL and every link)."""

    def __init__(self, server: AmqpConnection | None = None, *, sasl: str | None = "ANONYMOUS",
                 user: str | None = None, password: str | None = None, max_frame_size: int | None = None,
                 idle_timeout_s: float | None = None) -> None:
        self.server = server or AmqpConnection(ConnectionConfig())
        self.transport = proton.Transport(proton.Transport.CLIENT)
        if max_frame_size is not None:
            self.transport.max_frame_size = max_frame_size
        if idle_timeout_s is not None:
            self.transport.idle_timeout = idle_timeout_s
        self.connection = proton.Connection()
        self.connection.container = "proton-client"
        self.connection.hostname = "localhost"
        if user is not None:
            self.connection.user = user
            self.connection.password = password
        self.collector = proton.Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        if sasl is not None:
            layer = self.transport.sasl()
            layer.allowed_mechs(sasl)
            layer.allow_insecure_mechs = True  # PLAIN in memory: TLS is the adapter's job
        self.events: list[Event] = []
        self.on_event: Callable[[Event], None] = self.default_handler
        self.credit = 100

    def default_handler(self, event: Event) -> None:
        if isinstance(event, SaslInitReceived):
            self.server.sasl_outcome(SaslCode.OK)
        elif isinstance(event, LinkAttached):
            self.server.accept_link(event.link, credit=self.credit)

    def pump(self, rounds: int = 200) -> None:
        server, transport = self.server, self.transport
        for _ in range(rounds):
            moved = False
            pending = transport.pending()
            if pending > 0:
                server.receive_data(bytes(transport.peek(pending)))
                transport.pop(pending)
                moved = True
            while True:
                event = server.next_event()
                if event is NEED_DATA:
                    break
                self.events.append(event)
                self.on_event(event)
            out = server.data_to_send()
            if out:
                transport.push(out)
                moved = True
            if not moved:
                return

    def proton_events(self) -> list[Any]:
        seen = []
        while (event := self.collector.peek()) is not None:
            seen.append(event)
            self.collector.pop()
        return seen

    def open_session(self) -> proton.Session:
        self.connection.open()
        session = self.connection.session()
        session.open()
        return session
