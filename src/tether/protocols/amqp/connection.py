"""Sans-I/O AMQP 1.0 server connection: bytes in, events out; decisions in, bytes out.

`AmqpConnection` owns no socket, clock or thread. The caller feeds received bytes to
`receive_data()`, takes events from `next_event()` until `NEED_DATA`, calls the decision methods
(`sasl_outcome`, `accept_link`, `refuse_link`, `settle`, `send_transfer`, `detach`, `close`, …), and
writes whatever `data_to_send()` returns. Because AMQP multiplexes sessions and links and the engine
answers the mechanical frames itself (protocol headers, begin, end/detach/close echoes, session
windows, credit top-ups, heartbeats), output collects in one buffer, as in h2, instead of being
returned by each call. `tick(now)` does the idle bookkeeping with a time the caller supplies.

One port serves both openings: the SASL header (`AMQP 3.1.0.0`, answered with the configured
mechanisms; the caller decides the outcome) and the plain AMQP header (`AMQP 0.1.0.0`: the Node IoT
SDKs skip SASL and authenticate over `$cbs` or with their TLS client certificate).

Limits: the frame size we announce (`max_frame_size`), sessions (`channel_max` + 1), links per session
(`handle_max` + 1) and per connection (`max_links`), per-link message size (`accept_link`), and the
bytes of deliveries still arriving across all links (`max_pending_bytes`). Breaking the protocol or a
connection-wide limit raises `ProtocolError` from `next_event()`/`tick()`; answer with
`close(error)` and flush. A link-level violation (a message over the link's size) detaches that link
only and is reported as `LinkError`.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from . import errors as e
from .errors import ProtocolError
from .events import (
    NEED_DATA,
    ConnectionClosed,
    CreditChanged,
    DeliveryUpdated,
    Event,
    LinkAttached,
    LinkDetached,
    LinkError,
    MessageReceived,
    NeedData,
    Opened,
    ProtocolHeaderReceived,
    SaslInitReceived,
    SessionBegun,
    SessionEnded,
)
from .framing import (
    AMQP_HEADER,
    FRAME_SASL,
    HEADER_SIZE,
    HEARTBEAT,
    MIN_MAX_FRAME_SIZE,
    SASL_HEADER,
    decode_body,
    encode_frame,
    parse_frame_header,
)
from .links import Link, LinkState, OutgoingDelivery, Session
from .performatives import (
    Attach,
    Begin,
    Close,
    Detach,
    Disposition,
    End,
    Error,
    Flow,
    Open,
    Role,
    SaslCode,
    SaslInit,
    SaslMechanisms,
    SaslOutcome,
    Source,
    Target,
    Transfer,
)

__all__ = ["AmqpConnection", "ConnectionConfig", "ConnectionState"]

_MOD: Final = 1 << 32
_WINDOW: Final = 0x7FFF_FFFF


class ConnectionState(enum.Enum):
    AWAIT_HEADER = 1
    SASL_INIT = 2  # sasl-mechanisms sent, waiting for sasl-init
    SASL_DECIDING = 3  # waiting for the caller's outcome
    SASL_DONE = 4  # outcome sent, waiting for the AMQP header
    AWAIT_OPEN = 5
    OPENED = 6
    CLOSE_SENT = 7
    CLOSED = 8


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    container_id: str = "tether"
    max_frame_size: int = 65_536
    channel_max: int = 63
    handle_max: int = 63
    max_links: int = 256
    idle_time_out_ms: int | None = 240_000
    incoming_window: int = 2_048  # transfer frames per session between our session flows
    sasl_mechanisms: tuple[str, ...] = ("MSSBCBS", "ANONYMOUS", "PLAIN", "EXTERNAL")
    allow_plain_header: bool = True
    max_pending_bytes: int = 1_048_576
    properties: dict[Any, Any] | None = None


_FRAME_HEAD = struct.Struct(">IBBH")


def _frame_bytes(channel: int, performative: bytes, payload: bytes) -> bytes:
    return b"".join((_FRAME_HEAD.pack(8 + len(performative) + len(payload), 2, 0, channel), performative,
                     payload))


def _seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit serial number arithmetic (RFC 1982), as a signed value."""
    d = (a - b) % _MOD
    return d - _MOD if d >= 1 << 31 else d


class AmqpConnection:
    """One server-side AMQP connection's protocol state (see the module docstring)."""

    def __init__(self, config: ConnectionConfig | None = None) -> None:
        self.config = config or ConnectionConfig()
        if self.config.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ValueError("max_frame_size below 512")
        self.state = ConnectionState.AWAIT_HEADER
        self.sasl_mechanism: str | None = None
        self.remote_open: Open | None = None
        self.sessions: dict[int, Session] = {}
        self.link_count = 0
        self._in = bytearray()
        self._pos = 0
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._error: ProtocolError | None = None
        self._out_frame_size = MIN_MAX_FRAME_SIZE
        self._pending_bytes = 0
        self._rx = False
        self._tx = False
        self._last_rx: float | None = None
        self._last_tx: float | None = None

    # --- bytes in and out ---------------------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        return len(self._in) - self._pos

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    def receive_data(self, data: bytes) -> None:
        if self.state is ConnectionState.CLOSED or self._error is not None:
            return
        if self._pos and self._pos == len(self._in):
            self._in.clear()
            self._pos = 0
        self._in += data
        self._rx = True

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._tx = True
        return data

    def _send(self, data: bytes) -> None:
        self._out.append(data)

    def _frame(self, channel: int, body: Any, payload: bytes = b"") -> None:
        self._out.append(encode_frame(channel, body, payload))

    # --- events -------------------------------------------------------------------------------------
    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises `ProtocolError` (again on every later call) when the
        peer broke the protocol or a limit."""
        if self._error is not None:
            raise self._error
        try:
            while not self._events:
                if not self._step():
                    return NEED_DATA
        except ProtocolError as exc:
            self._error = exc
            raise
        return self._events.popleft()

    def _consume(self, size: int) -> None:
        self._pos += size
        if self._pos > 65_536 and self._pos * 2 > len(self._in):
            del self._in[: self._pos]
            self._pos = 0

    def _step(self) -> bool:
        state = self.state
        if state in (ConnectionState.SASL_DECIDING, ConnectionState.CLOSED):
            return False
        buf, pos = self._in, self._pos
        available = len(buf) - pos
        if available < HEADER_SIZE:
            return False
        if state is ConnectionState.AWAIT_HEADER or state is ConnectionState.SASL_DONE:
            header = bytes(buf[pos: pos + HEADER_SIZE])
            self._consume(HEADER_SIZE)
            self._on_header(header)
            return True
        head = parse_frame_header(buf, pos, self.config.max_frame_size)
        if available < head.size:
            return False
        body = bytes(buf[pos + head.body_offset: pos + head.size])
        self._consume(head.size)
        if head.frame_type == FRAME_SASL:
            self._on_sasl_frame(body)
            return True
        if state is ConnectionState.SASL_INIT:
            raise ProtocolError(e.FRAMING_ERROR, "AMQP frame during SASL", reason="bad-frame")
        if not body:
            return True  # heartbeat
        performative, payload = decode_body(body)
        self._dispatch(head.channel, performative, payload)
        return True

    # --- headers and SASL ---------------------------------------------------------------------------
    def _on_header(self, header: bytes) -> None:
        mechanisms = self.config.sasl_mechanisms
        if self.state is ConnectionState.AWAIT_HEADER and header == SASL_HEADER and mechanisms:
            self._send(SASL_HEADER)
            self._send(encode_frame(0, SaslMechanisms(mechanisms), frame_type=FRAME_SASL))
            self.state = ConnectionState.SASL_INIT
            self._events.append(ProtocolHeaderReceived(sasl=True))
            return
        plain_ok = self.config.allow_plain_header or self.state is ConnectionState.SASL_DONE
        if header == AMQP_HEADER and plain_ok:
            self._send(AMQP_HEADER)
            self.state = ConnectionState.AWAIT_OPEN
            self._events.append(ProtocolHeaderReceived(sasl=False))
            return
        wanted_sasl = self.state is ConnectionState.AWAIT_HEADER and mechanisms
        self._send(SASL_HEADER if wanted_sasl and not self.config.allow_plain_header else AMQP_HEADER)
        self.state = ConnectionState.CLOSED
        raise ProtocolError(e.FRAMING_ERROR, "unsupported protocol header", reason="bad-protocol-header")

    def _on_sasl_frame(self, body: bytes) -> None:
        if self.state is not ConnectionState.SASL_INIT or not body:
            raise ProtocolError(e.FRAMING_ERROR, "unexpected SASL frame", reason="bad-frame")
        frame, _ = decode_body(body)
        if not isinstance(frame, SaslInit):
            raise ProtocolError(e.FRAMING_ERROR, "expected sasl-init", reason="bad-frame")
        self.state = ConnectionState.SASL_DECIDING
        self._events.append(SaslInitReceived(frame.mechanism, frame.initial_response, frame.hostname))

    def sasl_outcome(self, code: SaslCode) -> None:
        """Answer the `SaslInitReceived`; anything but OK ends the connection (flush, then close)."""
        if self.state is not ConnectionState.SASL_DECIDING:
            raise RuntimeError("no SASL exchange is waiting for an outcome")
        self._send(encode_frame(0, SaslOutcome(int(code)), frame_type=FRAME_SASL))
        self.state = ConnectionState.SASL_DONE if code == SaslCode.OK else ConnectionState.CLOSED

    # --- performatives ------------------------------------------------------------------------------
    def _dispatch(self, channel: int, performative: Any, payload: bytes) -> None:
        kind = type(performative)
        if self.state is ConnectionState.CLOSE_SENT:
            if kind is Close:
                self.state = ConnectionState.CLOSED
                self._events.append(ConnectionClosed(performative.error))
            return  # after our close, everything else is ignored
        if self.state is ConnectionState.AWAIT_OPEN:
            if kind is not Open:
                raise ProtocolError(e.ILLEGAL_STATE, "the first frame must be open", reason="no-open")
            self._on_open(performative)
            return
        if kind is Transfer:
            self._on_transfer(self._session(channel), performative, payload)
        elif kind is Disposition:
            self._on_disposition(self._session(channel), performative)
        elif kind is Flow:
            self._on_flow(self._session(channel), performative)
        elif kind is Attach:
            self._on_attach(self._session(channel), performative)
        elif kind is Detach:
            self._on_detach(self._session(channel), performative)
        elif kind is Begin:
            self._on_begin(channel, performative)
        elif kind is End:
            self._on_end(self._session(channel), performative)
        elif kind is Close:
            self._frame(0, Close())
            self.state = ConnectionState.CLOSED
            self._events.append(ConnectionClosed(performative.error))
        else:  # a second open, or a SASL body in an AMQP frame
            raise ProtocolError(e.ILLEGAL_STATE, f"unexpected {kind.__name__}", reason="bad-frame")

    def _session(self, channel: int) -> Session:
        session = self.sessions.get(channel)
        if session is None:
            raise ProtocolError(e.ILLEGAL_STATE, f"no session on channel {channel}", reason="bad-channel")
        return session

    def _on_open(self, frame: Open) -> None:
        config = self.config
        self.remote_open = frame
        self._out_frame_size = max(MIN_MAX_FRAME_SIZE, min(frame.max_frame_size, config.max_frame_size))
        self._frame(0, Open(
            container_id=config.container_id, hostname=None, max_frame_size=config.max_frame_size,
            channel_max=config.channel_max, idle_time_out=config.idle_time_out_ms,
            properties=config.properties,
        ))
        self.state = ConnectionState.OPENED
        self._events.append(Opened(frame))

    def _on_begin(self, channel: int, frame: Begin) -> None:
        config = self.config
        if channel > config.channel_max:
            raise ProtocolError(e.FRAMING_ERROR, "channel above channel-max", reason="too-many-sessions")
        if channel in self.sessions or frame.remote_channel is not None:
            raise ProtocolError(e.ILLEGAL_STATE, "session already begun", reason="bad-begin")
        session = Session(channel=channel, handle_max=config.handle_max,
                          next_incoming_id=frame.next_outgoing_id, incoming_window=config.incoming_window,
                          remote_incoming_window=frame.incoming_window,
                          remote_outgoing_window=frame.outgoing_window)
        self.sessions[channel] = session
        self._frame(channel, Begin(remote_channel=channel, next_outgoing_id=0,
                                   incoming_window=config.incoming_window, outgoing_window=_WINDOW,
                                   handle_max=config.handle_max))
        self._events.append(SessionBegun(channel))

    def _on_end(self, session: Session, frame: End) -> None:
        del self.sessions[session.channel]
        for link in list(session.links.values()):
            self._forget(link)
            if link.state is not LinkState.DETACH_SENT:
                self._events.append(LinkDetached(link, None, False))
        if not session.ending:
            self._frame(session.channel, End())
            self._events.append(SessionEnded(session.channel, frame.error))

    def end_session(self, channel: int, error: Error | None = None) -> None:
        """End a session ourselves (its links are gone once the peer answers)."""
        session = self.sessions.get(channel)
        if session is None or session.ending or self.state is not ConnectionState.OPENED:
            return
        session.ending = True
        self._frame(channel, End(error))

    # --- links --------------------------------------------------------------------------------------
    def _on_attach(self, session: Session, frame: Attach) -> None:
        if frame.handle > session.handle_max:
            raise ProtocolError(e.FRAMING_ERROR, "handle above handle-max", reason="too-many-links")
        if frame.handle in session.links:
            raise ProtocolError(e.HANDLE_IN_USE, f"handle {frame.handle} is in use", reason="bad-attach")
        if self.link_count >= self.config.max_links:
            raise ProtocolError(e.RESOURCE_LIMIT_EXCEEDED, "too many links", reason="too-many-links")
        role = Role.SENDER if frame.role else Role.RECEIVER
        link = Link(session=session, handle=frame.handle, name=frame.name, role=role, attach=frame)
        if role is Role.RECEIVER:
            link.delivery_count = frame.initial_delivery_count or 0
        session.links[frame.handle] = link
        self.link_count += 1
        self._events.append(LinkAttached(link))

    def accept_link(
        self,
        link: Link,
        *,
        source: Source | None = None,
        target: Target | None = None,
        max_message_size: int | None = None,
        credit: int = 0,
        rcv_settle_mode: int | None = None,
        properties: dict[Any, Any] | None = None,
        offered_capabilities: tuple[str, ...] | None = None,
    ) -> None:
        """Answer a `LinkAttached` with our attach (the peer's terminus echoed unless given). A
        receiving link gets `credit` as its window, topped up as deliveries complete."""
        if link.state is not LinkState.ATTACH_RECEIVED:
            return  # the peer detached meanwhile
        peer = link.attach
        receiving = link.role is Role.RECEIVER
        link.max_message_size = max_message_size or 0
        self._frame(link.channel, Attach(
            name=link.name, handle=link.handle, role=bool(link.role), snd_settle_mode=peer.snd_settle_mode,
            rcv_settle_mode=(rcv_settle_mode if rcv_settle_mode is not None else
                             0 if receiving else peer.rcv_settle_mode),
            source=source if source is not None else peer.source,
            target=target if target is not None else peer.target,
            initial_delivery_count=None if receiving else 0, max_message_size=max_message_size,
            offered_capabilities=offered_capabilities, properties=properties,
        ))
        link.state = LinkState.ATTACHED
        if receiving and credit:
            self.grant_credit(link, credit)

    def refuse_link(self, link: Link, error: Error) -> None:
        """Answer a `LinkAttached` with a refusal: our attach with a null terminus, then detach with
        `error` (spec 2.6.3). The link is gone once the peer's detach arrives."""
        if link.state is not LinkState.ATTACH_RECEIVED:
            return
        self._send_refusing_attach(link)
        link.state = LinkState.ATTACHED
        self.detach(link, error)

    def _send_refusing_attach(self, link: Link) -> None:
        peer = link.attach
        receiving = link.role is Role.RECEIVER
        self._frame(link.channel, Attach(
            name=link.name, handle=link.handle, role=bool(link.role), snd_settle_mode=peer.snd_settle_mode,
            rcv_settle_mode=peer.rcv_settle_mode, source=peer.source if receiving else None,
            target=None if receiving else peer.target, initial_delivery_count=None if receiving else 0,
        ))

    def detach(self, link: Link, error: Error | None = None, *, closed: bool = True) -> None:
        """Detach a link ourselves; its unsettled outgoing deliveries are forgotten."""
        if link.state is not LinkState.ATTACHED or self.state is not ConnectionState.OPENED:
            return
        self._frame(link.channel, Detach(handle=link.handle, closed=closed, error=error))
        link.state = LinkState.DETACH_SENT
        self._drop_partial(link)
        link.credit_window = 0
        self._drop_unsettled(link)

    def _on_detach(self, session: Session, frame: Detach) -> None:
        link = session.links.get(frame.handle)
        if link is None:
            raise ProtocolError(e.UNATTACHED_HANDLE, f"detach of unknown handle {frame.handle}",
                                reason="bad-detach")
        if link.state is LinkState.DETACH_SENT:
            self._forget(link)
            return
        if link.state is LinkState.ATTACH_RECEIVED:
            self._send_refusing_attach(link)
        self._frame(link.channel, Detach(handle=link.handle, closed=frame.closed))
        self._forget(link)
        self._events.append(LinkDetached(link, frame.error, frame.closed))

    def _forget(self, link: Link) -> None:
        session = link.session
        if session.links.get(link.handle) is link:
            del session.links[link.handle]
            self.link_count -= 1
        self._drop_partial(link)
        self._drop_unsettled(link)
        link.state = LinkState.DETACHED

    def _drop_unsettled(self, link: Link) -> None:
        unsettled = link.session.unsettled_out
        for delivery_id in [d for d, out in unsettled.items() if out.link is link]:
            del unsettled[delivery_id]

    def _drop_partial(self, link: Link) -> None:
        if link.partial is not None:
            self._pending_bytes -= link.partial_size
            link.partial = None
            link.partial_size = 0

    # --- flow control -------------------------------------------------------------------------------
    def _on_flow(self, session: Session, frame: Flow) -> None:
        if frame.next_incoming_id is None:
            session.remote_incoming_window = frame.incoming_window
        else:
            session.remote_incoming_window = max(
                0, frame.next_incoming_id + frame.incoming_window - session.next_outgoing_id)
        session.remote_outgoing_window = frame.outgoing_window
        self._flush_queued(session)
        link = None
        if frame.handle is not None:
            link = session.links.get(frame.handle)
            if link is None:
                raise ProtocolError(e.UNATTACHED_HANDLE, f"flow for unknown handle {frame.handle}",
                                    reason="bad-flow")
            if link.role is Role.SENDER:
                their_count = frame.delivery_count if frame.delivery_count is not None else 0
                credit = _seq_diff((their_count + (frame.link_credit or 0)) % _MOD, link.delivery_count)
                link.credit = max(0, credit)
                link.drain = frame.drain
                if link.state is not LinkState.DETACHED:
                    self._events.append(CreditChanged(link))
            else:
                if frame.available is not None:
                    link.available = frame.available
                if frame.delivery_count is not None:
                    limit = (link.delivery_count + link.credit) % _MOD
                    link.delivery_count = frame.delivery_count
                    link.credit = max(0, _seq_diff(limit, frame.delivery_count))
        if frame.echo:
            self._send_flow(session, link)

    def _send_flow(self, session: Session, link: Link | None) -> None:
        session.incoming_window = self.config.incoming_window
        body = Flow(
            next_incoming_id=session.next_incoming_id, incoming_window=session.incoming_window,
            next_outgoing_id=session.next_outgoing_id, outgoing_window=_WINDOW,
            handle=link.handle if link is not None else None,
            delivery_count=link.delivery_count if link is not None else None,
            link_credit=link.credit if link is not None else None,
            available=0 if link is not None and link.role is Role.SENDER else None,
            drain=link.drain if link is not None else False,
        )
        self._frame(session.channel, body)

    def grant_credit(self, link: Link, window: int) -> None:
        """Keep `window` credit open on a receiving link (0 stops topping it up)."""
        link.credit_window = window
        if window and link.state is LinkState.ATTACHED:
            link.credit = max(0, window - link.unsettled_in)
            self._send_flow(link.session, link)

    def _refill(self, link: Link) -> None:
        window = link.credit_window
        if window and link.state is LinkState.ATTACHED and link.credit + link.unsettled_in <= window // 2:
            link.credit = window - link.unsettled_in
            self._send_flow(link.session, link)

    def finish_drain(self, link: Link) -> None:
        """After a drain request has been served: use up the remaining credit and tell the peer."""
        if link.role is Role.SENDER and link.drain and link.state is LinkState.ATTACHED:
            link.delivery_count = (link.delivery_count + link.credit) % _MOD
            link.credit = 0
            self._send_flow(link.session, link)

    # --- transfers in -------------------------------------------------------------------------------
    def _on_transfer(self, session: Session, frame: Transfer, payload: bytes) -> None:
        session.incoming_window -= 1
        if session.incoming_window < 0:
            raise ProtocolError(e.WINDOW_VIOLATION, "transfer beyond the session window",
                                reason="window-violation")
        link = session.links.get(frame.handle)
        if link is None:
            raise ProtocolError(e.UNATTACHED_HANDLE, f"transfer on unknown handle {frame.handle}",
                                reason="bad-transfer")
        if link.role is not Role.RECEIVER:
            raise ProtocolError(e.ILLEGAL_STATE, "transfer on a link we send on", reason="bad-transfer")
        first = link.partial is None
        if first and link.state is LinkState.ATTACHED:
            if frame.delivery_id is None:
                raise ProtocolError(e.INVALID_FIELD, "first transfer without delivery-id",
                                    reason="bad-transfer")
            if link.credit <= 0:
                raise ProtocolError(e.TRANSFER_LIMIT_EXCEEDED, "transfer without link credit",
                                    reason="no-credit")
            link.credit -= 1
            link.delivery_count = (link.delivery_count + 1) % _MOD
            session.next_incoming_id = (frame.delivery_id + 1) % _MOD
            link.partial = []
            link.partial_size = 0
            link.partial_id = frame.delivery_id
            link.partial_tag = frame.delivery_tag or b""
            link.partial_settled = bool(frame.settled)
            link.partial_format = frame.message_format or 0
        if session.incoming_window < self.config.incoming_window // 2:
            self._send_flow(session, None)
        if link.state is not LinkState.ATTACHED or link.partial is None:
            return  # a transfer that crossed our detach
        if frame.aborted:
            self._drop_partial(link)
            return
        if frame.settled:
            link.partial_settled = True
        size = len(payload)
        link.partial_size += size
        self._pending_bytes += size
        if link.max_message_size and link.partial_size > link.max_message_size:
            self.detach(link, Error(e.MESSAGE_SIZE_EXCEEDED,
                                    f"message exceeds this link's limit of {link.max_message_size} bytes"))
            self._events.append(LinkError(link, Error(e.MESSAGE_SIZE_EXCEEDED)))
            return
        if self._pending_bytes > self.config.max_pending_bytes:
            raise ProtocolError(e.RESOURCE_LIMIT_EXCEEDED, "too many bytes of unfinished deliveries",
                                reason="pending-bytes")
        link.partial.append(payload)
        if frame.more:
            return
        data = link.partial[0] if len(link.partial) == 1 else b"".join(link.partial)
        self._drop_partial(link)
        settled = link.partial_settled
        if not settled:
            link.unsettled_in += 1
        self._events.append(MessageReceived(link, link.partial_id, link.partial_tag, settled, data,
                                            link.partial_format))
        if settled:
            self._refill(link)

    def settle(self, link: Link, delivery_ids: Iterable[int], state: Any, *, settled: bool = True) -> None:
        """Our disposition for deliveries received on `link` (consecutive ids share one frame)."""
        ids = sorted(delivery_ids)
        if not ids or self.state is not ConnectionState.OPENED:
            return
        start = prev = ids[0]
        for delivery_id in ids[1:]:
            if delivery_id != prev + 1:
                self._disposition(link, start, prev, state, settled)
                start = delivery_id
            prev = delivery_id
        self._disposition(link, start, prev, state, settled)
        if settled:
            link.unsettled_in = max(0, link.unsettled_in - len(ids))
            self._refill(link)

    def _disposition(self, link: Link, first: int, last: int, state: Any, settled: bool) -> None:
        self._frame(link.channel,
                    Disposition(role=True, first=first, last=last, settled=settled, state=state))

    # --- transfers out ------------------------------------------------------------------------------
    def send_transfer(self, link: Link, payload: bytes, *, settled: bool, tag: bytes | None = None,
                      message_format: int = 0) -> int:
        """Send one message on a sending link with credit; returns its delivery id. Frames beyond the
        peer's session window wait for its next flow."""
        if link.role is not Role.SENDER or link.state is not LinkState.ATTACHED:
            raise RuntimeError("not an attached sending link")
        if link.credit <= 0:
            raise RuntimeError("no link credit")
        session = link.session
        delivery_id = session.next_outgoing_id
        session.next_outgoing_id = (delivery_id + 1) % _MOD
        if tag is None:
            tag = link.next_tag.to_bytes(4, "big")
            link.next_tag = (link.next_tag + 1) % _MOD
        link.credit -= 1
        link.delivery_count = (link.delivery_count + 1) % _MOD
        first = Transfer(handle=link.handle, delivery_id=delivery_id, delivery_tag=tag,
                         message_format=message_format, settled=settled, more=False).encode()
        channel = link.channel
        if len(first) + len(payload) + 8 <= self._out_frame_size:
            self._transfer_frame(session, _frame_bytes(channel, first, payload))
        else:
            first = Transfer(handle=link.handle, delivery_id=delivery_id, delivery_tag=tag,
                             message_format=message_format, settled=settled, more=True).encode()
            more = Transfer(handle=link.handle, delivery_id=delivery_id, more=True).encode()
            last = Transfer(handle=link.handle, delivery_id=delivery_id, more=False).encode()
            pos, end = 0, len(payload)
            head = first
            while True:
                room = self._out_frame_size - 8 - len(head)
                if pos + room >= end:
                    if head is more:
                        head = last
                    elif head is first:  # cannot happen: the payload did not fit in one frame
                        raise AssertionError("transfer split")
                    self._transfer_frame(session, _frame_bytes(channel, head, payload[pos:end]))
                    break
                self._transfer_frame(session, _frame_bytes(channel, head, payload[pos: pos + room]))
                pos += room
                head = more
        if not settled:
            session.unsettled_out[delivery_id] = OutgoingDelivery(link, tag)
        return delivery_id

    def _transfer_frame(self, session: Session, frame: bytes) -> None:
        if session.remote_incoming_window > 0 and not session.queued:
            session.remote_incoming_window -= 1
            self._out.append(frame)
        else:
            session.queued.append(frame)

    def _flush_queued(self, session: Session) -> None:
        queued = session.queued
        while queued and session.remote_incoming_window > 0:
            session.remote_incoming_window -= 1
            self._out.append(queued.popleft())

    def settle_outgoing(self, link: Link, delivery_id: int, state: Any = None) -> None:
        """Settle a delivery we sent (e.g. after the peer's unsettled disposition)."""
        link.session.unsettled_out.pop(delivery_id, None)
        if self.state is ConnectionState.OPENED and link.state is LinkState.ATTACHED:
            self._frame(link.channel, Disposition(role=False, first=delivery_id, last=delivery_id,
                                                  settled=True, state=state))

    def _on_disposition(self, session: Session, frame: Disposition) -> None:
        if not frame.role:
            return  # the peer, as sender, settling what it sent us: nothing is waiting for that
        unsettled = session.unsettled_out
        first = frame.first
        last = frame.last if frame.last is not None else first
        span = _seq_diff(last, first)
        if span < 0:
            raise ProtocolError(e.INVALID_FIELD, "disposition range ends before it starts",
                                reason="bad-disposition")
        if span + 1 <= len(unsettled):
            ids: Iterable[int] = [(first + i) % _MOD for i in range(span + 1)]
        else:
            ids = sorted(d for d in unsettled if 0 <= _seq_diff(d, first) <= span)
        for delivery_id in ids:
            out = unsettled.get(delivery_id)
            if out is None:
                continue
            if frame.settled:
                del unsettled[delivery_id]
            self._events.append(DeliveryUpdated(out.link, delivery_id, out.tag, frame.state, frame.settled))

    # --- closing and idleness -----------------------------------------------------------------------
    def close(self, error: Error | None = None) -> None:
        """Close the connection (with `error` after a failure); flush `data_to_send()` afterwards.
        Before the open exchange an open is sent first, as the spec asks."""
        state = self.state
        if state is ConnectionState.AWAIT_OPEN:
            self._frame(0, Open(container_id=self.config.container_id))
            self._frame(0, Close(error))
        elif state is ConnectionState.OPENED:
            self._frame(0, Close(error))
        elif state is ConnectionState.SASL_INIT:
            self._send(encode_frame(0, SaslOutcome(int(SaslCode.SYS_PERM)), frame_type=FRAME_SASL))
        self.state = ConnectionState.CLOSE_SENT if state is ConnectionState.OPENED else ConnectionState.CLOSED

    def tick(self, now: float) -> float | None:
        """Idle bookkeeping at time `now` (seconds, any monotonic clock): sends a heartbeat when we
        have been quiet for half the peer's idle time-out, raises `ProtocolError` when the peer has
        been silent past ours. Returns when to call again (None: no timer needed)."""
        if self._rx or self._last_rx is None:
            self._last_rx = now
            self._rx = False
        if self._tx or self._last_tx is None:
            self._last_tx = now
            self._tx = False
        if self.state is not ConnectionState.OPENED:
            return None
        deadlines = []
        ours = self.config.idle_time_out_ms
        if ours:
            limit = self._last_rx + ours / 1000
            if now >= limit:
                self._error = ProtocolError(e.RESOURCE_LIMIT_EXCEEDED, "idle time-out expired",
                                            reason="idle-timeout")
                raise self._error
            deadlines.append(limit)
        theirs = self.remote_open.idle_time_out if self.remote_open is not None else None
        if theirs:
            interval = theirs / 2000
            due = self._last_tx + interval
            if now >= due and not self._out:
                self._send(HEARTBEAT)
                due = now + interval
            deadlines.append(due)
        return min(deadlines) if deadlines else None
