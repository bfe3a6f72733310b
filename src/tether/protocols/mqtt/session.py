"""One MQTT connection's state machine with Azure IoT Hub's rules; it owns no socket.

The adapters (`server.py` for TCP/TLS, `websocket.py`) feed received bytes to `data_received()` and
give the session a `Link` to write to. Everything Azure-specific lives here: CONNECT checks
(client id, username, host name) and authentication, topic rights, QoS 2 and size refusals, the rate
limit, keep-alive, token expiry, presence and activity. Refusals are audited and close only this
connection.

Telemetry is pipelined: each PUBLISH starts its `stream.append` at once (appends start in arrival
order, so the stream keeps the device's order) and PUBACKs go out strictly in arrival order as the
appends become durable, so one device can have many messages in one group commit.

Twin and method topics and subscriptions go to the protocol-neutral `DeviceHooks`
(`hub.device_sessions`); as the identity's `ConnectionHandle` the session renders what the hub sends
back (C2D messages, desired patches, method requests) as PUBLISHes on Azure's topics.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from cryptography import x509

from tether.errors import TetherError
from tether.messaging.c2d import C2DMessage, C2DOutcome
from tether.observability.metrics import CONNECTED_DEVICES, DISCONNECTS
from tether.protocols.mqtt.codec import (
    NEED_DATA,
    MqttConnection,
    ProtocolError,
    encode_puback,
    encode_publish,
)
from tether.protocols.mqtt.context import Link, MqttContext
from tether.protocols.mqtt.devicebound import c2d_message_topic
from tether.protocols.mqtt.packets import (
    ConnAck,
    ConnAckCode,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from tether.protocols.mqtt.topics import (
    MethodResponse,
    PublishTarget,
    SubscriptionKind,
    Telemetry,
    TopicError,
    TwinGet,
    TwinReportedPatch,
    classify_publish,
    classify_subscribe,
    desired_patch_topic,
    method_request_topic,
    parse_username,
    twin_response_topic,
)
from tether.security.principal import AuthRefused, Principal
from tether.security.sas import same_hub_host
from tether.security.throttle import RATE_LIMITED

__all__ = ["Link", "MqttContext", "MqttSession"]

log = logging.getLogger("tether.mqtt")

MAX_INFLIGHT = 512  # unacknowledged publishes per connection before we stop reading
RESUME_INFLIGHT = MAX_INFLIGHT // 2
KEEPALIVE_FACTOR = 1.5
# Azure's ceiling, and what a client asking for none (0) gets: no connection idles forever.
MAX_KEEPALIVE_S = 1177


class _State(enum.Enum):
    WAIT_CONNECT = 1
    AUTHENTICATING = 2
    CONNECTED = 3
    CLOSED = 4


class MqttSession:
    """One device connection; becomes the device's `ConnectionHandle` once authenticated."""

    def __init__(
        self,
        ctx: MqttContext,
        link: Link,
        *,
        peer: str | None,
        peer_chain: Callable[[], Sequence[x509.Certificate]] = lambda: (),
        protocol: str = "mqtt",
    ) -> None:
        self._ctx = ctx
        self._link = link
        self.peer = peer
        self._peer_chain = peer_chain
        self._protocol = protocol
        self._surface = "mqtt" if protocol == "mqtt" else "mqttws"  # the authenticator's surface label
        self._loop = asyncio.get_running_loop()
        self._codec = MqttConnection("server", max_packet_size=ctx.limits.max_mqtt_packet_bytes)
        self._state = _State.WAIT_CONNECT
        self.principal: Principal | None = None
        self.closed_reason: str | None = None
        self._closed = asyncio.Event()
        self._model_id: str | None = None
        self._clean_session = True
        self._registered = False
        self._pending: deque[tuple[int | None, asyncio.Future[Any] | None]] = deque()
        self._inflight_paused = False
        self._outbound: dict[int, asyncio.Future[None]] = {}
        self._next_packet_id = 0
        self._early: list[bytes] = []  # deliveries made between registration and CONNACK
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_rx = self._loop.time()
        self._keepalive_s = 0.0
        self._next_touch = 0.0
        self._join: asyncio.Future[Any] | None = None
        self._last_topic: str | None = None
        self._last_target: PublishTarget | None = None
        self._timers: list[asyncio.TimerHandle] = [
            self._loop.call_later(ctx.limits.connect_timeout_s, self._on_connect_timeout)
        ]

    # --- ConnectionHandle -------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def family(self) -> str:
        return "mqtt"  # TCP and WebSocket sessions share Azure's MQTT session state

    async def close(self, reason: str) -> None:
        self.shutdown(reason)

    def send_desired_patch(self, patch: bytes, version: int) -> None:
        sent = self.deliver(desired_patch_topic(version), patch, qos=0)  # QoS 0, as Azure sends it
        sent.add_done_callback(_retrieve)

    async def send_method_request(self, method_name: str, rid: str, payload: bytes) -> None:
        await self.deliver(method_request_topic(method_name, rid), payload, qos=0)

    async def send_c2d(self, message: C2DMessage) -> C2DOutcome:
        """QoS 1 on `devices/{id}/messages/devicebound/{bag}`: complete on PUBACK (MQTT devices
        cannot reject or abandon)."""
        try:
            topic = c2d_message_topic(message)
        except TopicError:  # text no MQTT topic can carry: it would never be deliverable
            log.warning("C2D message %s for %s cannot be encoded in a topic; rejected",
                        message.message_id, message.device_id)
            return C2DOutcome.REJECT
        await self.deliver(topic, message.body, qos=1)
        return C2DOutcome.COMPLETE

    def deliver(self, topic: str, payload: bytes, *, qos: int = 1) -> asyncio.Future[None]:
        """PUBLISH to the device. The future completes on its PUBACK (QoS 1) or once written (QoS 0),
        and fails with ConnectionError when the connection ends first."""
        done: asyncio.Future[None] = self._loop.create_future()
        if self._state is _State.CLOSED:
            done.set_exception(ConnectionError(self.closed_reason or "closed"))
            return done
        packet_id = None
        if qos:
            packet_id = self._allocate_packet_id()
            self._outbound[packet_id] = done
        data = encode_publish(topic, payload, 1 if qos else 0, packet_id)
        if self._state is _State.CONNECTED:
            self._link.write(data)
        else:
            self._early.append(data)
        if not qos:
            done.set_result(None)
        return done

    def _allocate_packet_id(self) -> int:
        if len(self._outbound) >= 0xFFFF:
            raise ConnectionError("no free packet id")
        while True:
            self._next_packet_id = self._next_packet_id % 0xFFFF + 1
            if self._next_packet_id not in self._outbound:
                return self._next_packet_id

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    # --- input from the adapter -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._state is _State.CLOSED:
            return
        self._last_rx = self._loop.time()
        self._codec.receive_data(data)
        if self._codec.buffered_bytes > 4 * self._ctx.limits.max_mqtt_packet_bytes:
            self._refuse("mqtt.protocol", "input-overflow")  # kept sending while we could not read
            return
        self._drain()

    def connection_lost(self) -> None:
        self.shutdown("peer-closed")

    def _drain(self) -> None:
        try:
            self._drain_packets()
        finally:
            self._join = None  # telemetry of one read shares one append future (see _on_publish)

    def _drain_packets(self) -> None:
        codec = self._codec
        while not self._inflight_paused and (
            self._state is _State.CONNECTED or self._state is _State.WAIT_CONNECT
        ):
            try:
                packet = codec.next_event()
            except ProtocolError as exc:
                self._on_protocol_error(exc)
                return
            if packet is NEED_DATA:
                return
            if type(packet) is Publish:
                self._on_publish(packet)
            else:
                self._dispatch(packet)

    def _dispatch(self, packet: Packet) -> None:
        if isinstance(packet, Connect):
            self._on_connect(packet)
        elif isinstance(packet, PingReq):
            self._link.write(self._codec.send(PingResp()))
        elif isinstance(packet, PubAck):
            done = self._outbound.pop(packet.packet_id, None)
            if done is not None and not done.done():
                done.set_result(None)
        elif isinstance(packet, Subscribe):
            self._on_subscribe(packet)
        elif isinstance(packet, Unsubscribe):
            self._link.write(self._codec.send(UnsubAck(packet.packet_id)))
        elif isinstance(packet, Disconnect):
            self.shutdown("client-disconnect")
        else:  # PUBREC / PUBREL / PUBCOMP: QoS 2 flows
            self._refuse("mqtt.publish", "qos2-not-supported")

    # --- CONNECT ----------------------------------------------------------------------------------
    def _on_connect(self, packet: Connect) -> None:
        self._cancel_timers()
        if packet.username is None:
            self._refuse_connect(ConnAckCode.BAD_USERNAME_OR_PASSWORD, "missing-username", packet.client_id)
            return
        try:
            user = parse_username(packet.username)
        except TopicError:
            self._refuse_connect(ConnAckCode.BAD_USERNAME_OR_PASSWORD, "bad-username", packet.client_id)
            return
        expected = f"{user.device_id}/{user.module_id}" if user.module_id else user.device_id
        if packet.client_id != expected:
            self._refuse_connect(ConnAckCode.IDENTIFIER_REJECTED, "client-id-mismatch", expected,
                                 {"client_id": packet.client_id})
            return
        if not same_hub_host(user.hostname, self._ctx.hostname):
            self._refuse_connect(ConnAckCode.BAD_USERNAME_OR_PASSWORD, "wrong-hostname", expected,
                                 {"hostname": user.hostname})
            return
        self._model_id = user.query.get("model-id") or None
        self._clean_session = packet.clean_session
        self._keepalive_s = min(packet.keep_alive or MAX_KEEPALIVE_S, MAX_KEEPALIVE_S) * KEEPALIVE_FACTOR
        self._state = _State.AUTHENTICATING
        self._link.pause_reading()
        self._spawn(self._authenticate(packet.password, user.device_id, user.module_id))

    async def _authenticate(self, password: bytes | None, device_id: str, module_id: str | None) -> None:
        ctx = self._ctx
        epoch = ctx.connections.epoch(device_id, module_id)
        surface = self._surface
        try:
            chain = () if password else self._peer_chain()
            if chain:
                principal = await ctx.authenticator.device_certificate(
                    chain, device_id, module_id, surface=surface, peer=self.peer
                )
            else:
                token = (password or b"").decode("utf-8", "replace")
                principal = await ctx.authenticator.device_sas(
                    token, device_id, module_id, surface=surface, peer=self.peer
                )
        except AuthRefused as exc:
            refused = exc.not_authorized or exc.reason == "device-disabled"
            code = ConnAckCode.NOT_AUTHORIZED if refused else ConnAckCode.BAD_USERNAME_OR_PASSWORD
            if exc.reason == RATE_LIMITED:
                code = ConnAckCode.SERVER_UNAVAILABLE  # throttled: back off and retry later
            # the authenticator wrote the audit record; the disconnect counter is public
            self._refuse_connect(code, exc.public_reason, None)
            return
        except Exception:
            log.exception("authentication of %s failed", device_id)
            self._refuse_connect(ConnAckCode.SERVER_UNAVAILABLE, "internal-error", None)
            return
        if self._state is not _State.AUTHENTICATING:
            return  # the peer went away meanwhile
        self.principal = principal
        self._registered = True
        CONNECTED_DEVICES.labels(self._protocol).inc()
        await ctx.connections.register(device_id, module_id, self)
        if self._state is not _State.AUTHENTICATING:
            return
        if ctx.connections.epoch(device_id, module_id) != epoch:  # disabled or deleted meanwhile
            self.shutdown("device-disabled")
            return
        self._link.write(self._codec.send(ConnAck(False, ConnAckCode.ACCEPTED)))
        self._state = _State.CONNECTED
        if self._early:
            self._link.write(b"".join(self._early))
            self._early.clear()
        self._start_timers(principal)
        self._spawn(ctx.activity.touch(device_id, module_id, connected=True))
        self._spawn(ctx.hooks.connected(principal, self, persistent=not self._clean_session))
        self._next_touch = self._loop.time() + ctx.activity_interval_s
        self._link.resume_reading()
        self._drain()

    def _refuse_connect(
        self, code: int, reason: str, identity: str | None, details: dict[str, Any] | None = None
    ) -> None:
        """CONNACK with a refusal code, then close. `identity` given: audit here (pre-auth checks)."""
        if self._state is _State.CLOSED:
            return
        if identity is not None:  # pre-auth refusal; the authenticator counts and audits its own
            device = identity.partition("/")[0] or None
            self._refuse_early(reason, principal=f"device:{identity}" if identity else None,
                               target=device, details=details)
        self._link.write(self._codec.send(ConnAck(False, code)))
        self.shutdown(reason)

    # --- PUBLISH ----------------------------------------------------------------------------------
    def _on_publish(self, packet: Publish) -> None:
        principal = self.principal
        assert principal is not None and principal.device_id is not None
        if packet.qos == 2:
            self._refuse("mqtt.publish", "qos2-not-supported", topic=packet.topic)
            return
        telemetry = self._ctx.telemetry
        if not telemetry.allow(principal):
            self._refuse("mqtt.publish", "rate-limited", topic=packet.topic)
            return
        topic = packet.topic
        target: PublishTarget | None = self._last_target if topic == self._last_topic else None
        if target is None:  # devices tend to repeat one telemetry topic: it is parsed once
            try:
                target = classify_publish(topic, principal.device_id, principal.module_id)
            except TopicError as exc:
                self._refuse("mqtt.publish", exc.reason, topic=topic)
                return
            if isinstance(target, Telemetry):
                self._last_topic, self._last_target = topic, target
        now = self._loop.time()
        if now >= self._next_touch:
            self._next_touch = now + self._ctx.activity_interval_s
            self._spawn(self._ctx.activity.touch(principal.device_id, principal.module_id))
        if isinstance(target, Telemetry):
            if telemetry.too_large(packet.payload):
                self._refuse("mqtt.publish", "message-too-large", topic=packet.topic,
                             size=len(packet.payload))
                return
            # No task per message: the stream queues the event now (keeping arrival order) and the
            # future resolves once it is durable; refusals take the same path as failed appends.
            # Appends of one read share a future while the stream still queues them (`join`).
            append: asyncio.Future[Any]
            try:
                append = telemetry.append_nowait(
                    principal, packet.payload, target.system_properties, target.properties,
                    protocol=self._protocol, model_id=self._model_id, join=self._join,
                )
            except Exception as exc:
                append = self._loop.create_future()
                append.set_exception(exc)
            self._enqueue(packet.packet_id, append, watch=append is not self._join)
            self._join = append
            return
        hooks = self._ctx.hooks
        if isinstance(target, TwinGet):
            self._spawn(self._answer_twin(target.rid, hooks.twin_get(principal)))
        elif isinstance(target, TwinReportedPatch):
            self._spawn(self._answer_twin(target.rid, hooks.twin_patch_reported(principal, packet.payload)))
        elif isinstance(target, MethodResponse):
            self._spawn(hooks.method_response(principal, target.rid, target.status, packet.payload))
        self._enqueue(packet.packet_id, None)

    def _enqueue(self, packet_id: int | None, work: asyncio.Future[Any] | None, *,
                 watch: bool = True) -> None:
        """Queue the PUBACK behind the ones still waiting, so acks leave in arrival order. `watch`:
        False when `work` is already watched (a group's shared append future)."""
        if work is None and not self._pending:
            if packet_id is not None:
                self._link.write(encode_puback(packet_id))
            return
        self._pending.append((packet_id, work))
        if work is not None and watch:
            work.add_done_callback(self._on_work_done)
        if len(self._pending) >= MAX_INFLIGHT and not self._inflight_paused:
            self._inflight_paused = True
            self._link.pause_reading()

    def _on_work_done(self, work: asyncio.Future[Any]) -> None:
        error = None if work.cancelled() else work.exception()  # marks the exception retrieved
        if self._state is _State.CLOSED:
            return
        if work.cancelled() or error is not None:
            self._append_failed(error)
            return
        pending = self._pending
        acks: list[bytes] = []
        while pending:
            packet_id, head = pending[0]
            if head is not None:
                if not head.done():
                    break
                if head.cancelled() or head.exception() is not None:
                    break  # its own callback closes the connection
            pending.popleft()
            if packet_id is not None:
                acks.append(encode_puback(packet_id))
        if acks:
            self._link.write(acks[0] if len(acks) == 1 else b"".join(acks))
        if self._inflight_paused and len(pending) <= RESUME_INFLIGHT:
            self._inflight_paused = False
            self._link.resume_reading()
            self._drain()

    def _append_failed(self, error: BaseException | None) -> None:
        if isinstance(error, TetherError) and error.http_status == 400:
            self._refuse("mqtt.publish", "invalid-message", detail=error.message)
            return
        log.error("telemetry append failed for %s: %r", self.principal and self.principal.name, error)
        self.shutdown("stream-error")  # no PUBACK: the device sends the message again

    async def _answer_twin(self, rid: str, call: Coroutine[Any, Any, tuple[Any, ...]]) -> None:
        try:
            result = await call
            status, body, version = result[0], result[1], (result[2] if len(result) > 2 else None)
        except Exception:
            log.exception("twin hook failed")
            status, body, version = 500, b"", None
        if self._state is _State.CONNECTED:
            self._link.write(encode_publish(twin_response_topic(status, rid, version), body))

    # --- SUBSCRIBE --------------------------------------------------------------------------------
    def _on_subscribe(self, packet: Subscribe) -> None:
        principal = self.principal
        assert principal is not None and principal.device_id is not None
        kinds: list[SubscriptionKind] = []
        granted: list[int] = []
        for topic_filter, qos in packet.topics:
            kind = classify_subscribe(topic_filter, principal.device_id, principal.module_id)
            if kind is None:
                reason = _subscribe_refusal(topic_filter, principal.device_id, principal.module_id)
                self._refuse("mqtt.subscribe", reason, topic=topic_filter)
                return
            kinds.append(kind)
            granted.append(min(qos, 1))
        self._link.write(self._codec.send(SubAck(packet.packet_id, tuple(granted))))
        self._spawn(self._ctx.hooks.subscribed(principal, self, kinds))

    # --- refusals, timers, shutdown ---------------------------------------------------------------
    def _on_protocol_error(self, exc: ProtocolError) -> None:
        if self._state is _State.WAIT_CONNECT:
            self._cancel_timers()
            if exc.connack_code is not None:
                self._refuse_connect(exc.connack_code, exc.reason, "")
            else:
                self._refuse_early(exc.reason)
                self.shutdown(exc.reason)
            return
        self._refuse("mqtt.protocol", exc.reason)

    def _refuse(self, action: str, reason: str, **details: Any) -> None:
        """Audit a refused action, then close the connection (Azure closes on any violation)."""
        if self._state is _State.CLOSED:
            return
        principal = self.principal
        self._audit(action, reason, principal=principal.name if principal else None,
                    credential=principal.credential.value if principal else None,
                    target=principal.device_id if principal else None, details=details or None)
        self.shutdown(reason)

    def _audit(self, action: str, reason: str, **fields: Any) -> None:
        self._spawn(self._ctx.audit.record(action, "refused", reason=reason, peer=self.peer, **fields))

    def _refuse_early(self, reason: str, **fields: Any) -> None:
        """A refusal before authentication: counted, charged to the peer's failure budget and audited
        (in aggregate once the peer floods) by the authenticator, like a failed authentication."""
        self._spawn(self._ctx.authenticator.refuse("mqtt.connect", reason, surface=self._surface,
                                                   peer=self.peer, **fields))

    def _on_connect_timeout(self) -> None:
        if self._state is _State.WAIT_CONNECT:
            self._refuse_early("connect-timeout")
            self.shutdown("connect-timeout")

    def _start_timers(self, principal: Principal) -> None:
        if self._keepalive_s > 0:
            self._timers.append(self._loop.call_later(self._keepalive_s, self._check_keepalive))
        if principal.expires_at is not None:
            skew = self._ctx.limits.sas_clock_skew_s
            delay = max(0.0, principal.expires_at + skew - self._ctx.clock())
            self._timers.append(self._loop.call_later(delay, self.shutdown, "token-expired"))

    def _check_keepalive(self) -> None:
        """One timer per connection, re-armed for the remaining time (no timer per packet)."""
        idle = self._loop.time() - self._last_rx
        if idle >= self._keepalive_s:
            self.shutdown("keepalive-timeout")
        elif self._state is _State.CONNECTED:
            self._timers.append(self._loop.call_later(self._keepalive_s - idle, self._check_keepalive))

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT session task failed", exc_info=task.exception())

    def shutdown(self, reason: str) -> None:
        """Close now (idempotent): in-flight appends still finish, but no PUBACK is sent after."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self.closed_reason = reason
        self._cancel_timers()
        self._link.close()
        for done in self._outbound.values():
            if not done.done():
                done.set_exception(ConnectionError(reason))
        self._outbound.clear()
        self._pending.clear()
        DISCONNECTS.labels(self._protocol, reason).inc()
        principal = self.principal
        if self._registered and principal is not None and principal.device_id is not None:
            self._registered = False
            CONNECTED_DEVICES.labels(self._protocol).dec()
            still_ours = self._ctx.connections.unregister(principal.device_id, principal.module_id, self)
            if still_ours and reason != "connection-replaced":  # a replacement is connected elsewhere
                self._spawn(self._ctx.activity.touch(principal.device_id, principal.module_id,
                                                     connected=False))
        log.debug("MQTT connection from %s closed: %s", self.peer, reason)
        self._closed.set()


def _subscribe_refusal(topic_filter: str, device_id: str, module_id: str | None) -> str:
    """Why a filter was refused: it names another device, another module of this device (or a module
    when the identity is the device itself), or it is not an Azure filter at all."""
    parts = topic_filter.split("/")
    if parts[0] != "devices" or len(parts) < 2 or parts[1] == "+":
        return "forbidden-topic"
    if parts[1] != device_id:
        return "other-device"
    named_module = parts[3] if len(parts) > 3 and parts[2] == "modules" else None
    return "other-module" if named_module not in (None, module_id) else "forbidden-topic"


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()  # a dropped connection is not an error for a QoS 0 push: mark it retrieved
