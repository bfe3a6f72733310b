"""Direct methods: a service calls a named method on a connected device and waits for its answer.

Azure's semantics, kept here so every protocol surface (MQTT today, AMQP next) shares them:
- a device is *online* for methods when it has a live connection and its identity subscribed to
  methods on that connection's protocol family (MQTT `$iothub/methods/POST/#`, AMQP the methods
  links), and requests go out through `ConnectionHandle.send_method_request`; otherwise the call
  waits up to `connect_timeout_s` for that and then fails 404 `DeviceNotOnline` (404
  `DeviceNotFound` when the device does not exist at all);
- a subscription belongs to the identity, not to one connection, like Azure's MQTT persistent
  sessions (`clean_session=0`, which every Azure SDK uses): the SDK does not subscribe again after it
  reconnects to renew its token, and methods must keep working;
- the request carries a hub-unique `rid`; only the same identity answering that `rid` completes it
  (a response from another device, or an unknown rid, is ignored), and the first answer wins;
- no answer within `response_timeout_s` → 504 `GatewayTimeout`; the connection the request went out
  on closing first → 404 `DeviceNotOnline` at once (the request is lost with it: it is sent QoS 0 as
  Azure does), rather than making the caller sit out the timeout;
- with several hub nodes (`set_remote`, the cluster bus) an identity that is not online here is reached
  through the node holding it, with the same answers and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple, Protocol

from tether.errors import BadRequest, GatewayTimeout, NotFound, TetherError
from tether.messaging.presence import ConnectionHandle, ConnectionRegistry
from tether.registry.models import Device, validate_device_id
from tether.registry.modules import ModuleService, module_not_found
from tether.registry.service import RegistryService
from tether.security.authenticator import AuditSink

__all__ = [
    "CONNECT_TIMEOUT_RANGE",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_RESPONSE_TIMEOUT_S",
    "MAX_METHOD_NAME_LENGTH",
    "MAX_PAYLOAD_BYTES",
    "RESPONSE_TIMEOUT_RANGE",
    "MethodResult",
    "MethodService",
    "RemoteMethods",
    "validate_method_name",
]

log = logging.getLogger("tether.methods")

MAX_PAYLOAD_BYTES: Final = 128 * 1024  # Azure: direct-method payload ≤ 128 KB (request and response)
MAX_METHOD_NAME_LENGTH: Final = 128
RESPONSE_TIMEOUT_RANGE: Final = (5, 300)
CONNECT_TIMEOUT_RANGE: Final = (0, 300)
DEFAULT_RESPONSE_TIMEOUT_S: Final = 30
DEFAULT_CONNECT_TIMEOUT_S: Final = 0
ONLINE_POLL_S: Final = 0.1  # re-check presence this often while waiting for a device to connect
REMOTE_POLL_S: Final = 0.25  # with a cluster bus: ask the other hub nodes this often while waiting
_NAME_RE: Final = re.compile(r"[\x20-\x7e]+")  # printable ASCII; `/` is refused separately

Key = tuple[str, str | None]


class MethodResult(NamedTuple):
    """What the device answered: its status code and its JSON payload (None for an empty body)."""

    status: int
    payload: Any


class RemoteMethods(Protocol):
    """Reaches identities connected to other hub nodes (the cluster bus implements it)."""

    async def invoke(self, device_id: str, module_id: str | None, method_name: str, body: bytes,
                     response_timeout_s: int) -> MethodResult | None:
        """The answer of the node holding the identity, None when no node has it online for methods;
        raises the holder's error (504 GatewayTimeout, 404 DeviceNotOnline when it disconnected)."""
        ...


def validate_method_name(name: object) -> str:
    """1-128 printable ASCII characters without `/` (the device SDKs split the topic on `/`)."""
    if not isinstance(name, str) or not name:
        raise BadRequest("methodName must be a non-empty string", field="methodName")
    if len(name) > MAX_METHOD_NAME_LENGTH:
        raise BadRequest(f"methodName must be at most {MAX_METHOD_NAME_LENGTH} characters",
                         field="methodName")
    if "/" in name or not _NAME_RE.fullmatch(name):
        raise BadRequest("methodName must be printable ASCII without '/'", field="methodName")
    return name


def _check_timeout(value: object, name: str, bounds: tuple[int, int], default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer number of seconds", field=name)
    low, high = bounds
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high} seconds", field=name)
    return value


def encode_payload(payload: Any) -> bytes:
    """The request body the device gets: compact JSON (`null` for no payload), at most 128 KB."""
    try:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"payload is not JSON: {exc}", field="payload") from None
    if len(body) > MAX_PAYLOAD_BYTES:
        raise BadRequest(f"payload exceeds {MAX_PAYLOAD_BYTES} bytes", code="MessageTooLarge",
                         field="payload")
    return body


def decode_answer(body: bytes) -> Any:
    """The device's answer body as JSON; empty → None. A body that is not JSON (no Azure SDK sends
    one) is handed back as text rather than lost, so the caller can see what the device said."""
    if not body.strip():
        return None
    text = body.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _not_online(device_id: str, module_id: str | None, why: str) -> NotFound:
    who = f"{device_id}/{module_id}" if module_id else device_id
    return NotFound(f"device {who} is not online: {why}", code="DeviceNotOnline")


class MethodService:
    """Invokes direct methods over whatever connection the presence registry holds for a device."""

    def __init__(
        self,
        connections: ConnectionRegistry,
        *,
        registry: RegistryService | None = None,
        audit: AuditSink | None = None,
        modules: ModuleService | None = None,
    ) -> None:
        self._connections = connections
        self._registry = registry
        self._modules = modules
        self._audit = audit
        self._subscribed: dict[Key, str] = {}  # identity → the protocol family it subscribed on
        self._pending: dict[tuple[str, str | None, str], asyncio.Future[MethodResult]] = {}
        self._rids = itertools.count(1)
        self._online_changed = asyncio.Event()
        self._closed = False
        self._remote: RemoteMethods | None = None

    def set_remote(self, remote: RemoteMethods | None) -> None:
        """Route calls for identities not online here through `remote` (other hub nodes)."""
        self._remote = remote

    # --- what the device sessions report ----------------------------------------------------
    def subscribed(self, device_id: str, module_id: str | None, family: str) -> None:
        """The identity subscribed to method requests on a connection of protocol `family`
        (`ConnectionHandle.family`); kept across its reconnects over that family."""
        self._subscribed[(device_id, module_id)] = family
        self._wake()

    def unsubscribed(self, device_id: str, module_id: str | None = None) -> None:
        """The identity no longer receives method requests (a clean MQTT session, an UNSUBSCRIBE)."""
        self._subscribed.pop((device_id, module_id), None)

    def forget(self, device_id: str) -> None:
        """Drop the subscriptions of a device and its modules (the device was deleted)."""
        for key in [key for key in self._subscribed if key[0] == device_id]:
            del self._subscribed[key]

    def status_listener(self) -> Callable[[Device], Awaitable[None]]:
        """For `RegistryService.add_status_listener`: a deleted device loses its method
        subscriptions (a deleted device is reported enabled; a disabled one keeps them, since its
        connections are dropped anyway and the SDK does not subscribe again when it comes back)."""

        async def on_status(device: Device) -> None:
            if device.enabled:
                self.forget(device.device_id)

        return on_status

    def response(self, device_id: str, module_id: str | None, rid: str, status: int, body: bytes) -> bool:
        """A device answered request `rid`; True when it completed a pending call. Answers for an
        unknown rid, from another identity, or after the call ended are ignored."""
        answer = self._pending.get((device_id, module_id, rid))
        if answer is None or answer.done():
            log.debug("ignoring method response rid=%s from %s", rid, device_id)
            return False
        answer.set_result(MethodResult(int(status), decode_answer(body)))
        return True

    def online(self, device_id: str, module_id: str | None = None) -> ConnectionHandle | None:
        """The connection to send a request on, or None when the identity is not online for methods."""
        family = self._subscribed.get((device_id, module_id))
        if family is None:
            return None
        handle = self._connections.get(device_id, module_id)
        if handle is None or handle.closed or handle.family != family:
            return None
        return handle

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _wake(self) -> None:
        self._online_changed.set()
        self._online_changed = asyncio.Event()

    # --- the service call ---------------------------------------------------------------------
    async def invoke(
        self,
        device_id: str,
        module_id: str | None = None,
        *,
        method_name: str,
        payload: Any = None,
        response_timeout_s: int | None = DEFAULT_RESPONSE_TIMEOUT_S,
        connect_timeout_s: int | None = DEFAULT_CONNECT_TIMEOUT_S,
        actor: str | None = None,
    ) -> MethodResult:
        """Call `method_name` on the device (or module) and return its (status, payload).

        400 for a bad name, timeout or payload (> 128 KB); 404 DeviceNotFound / DeviceNotOnline;
        504 GatewayTimeout when no answer comes within `response_timeout_s`; 404 ModuleNotFound for
        an unknown module."""
        validate_device_id(device_id)
        if module_id is not None:
            validate_device_id(module_id, field="moduleId")
        name = validate_method_name(method_name)
        response_s = _check_timeout(response_timeout_s, "responseTimeoutInSeconds", RESPONSE_TIMEOUT_RANGE,
                                    DEFAULT_RESPONSE_TIMEOUT_S)
        connect_s = _check_timeout(connect_timeout_s, "connectTimeoutInSeconds", CONNECT_TIMEOUT_RANGE,
                                   DEFAULT_CONNECT_TIMEOUT_S)
        body = encode_payload(payload)
        try:
            result = await self._invoke(device_id, module_id, name, body, response_s, connect_s)
        except TetherError as exc:
            await self._record(actor, device_id, module_id, name, "failed", reason=exc.code)
            raise
        await self._record(actor, device_id, module_id, name, "ok", status=result.status)
        return result

    async def _invoke(self, device_id: str, module_id: str | None, name: str, body: bytes,
                      response_s: int, connect_s: int) -> MethodResult:
        if self._closed:
            raise _not_online(device_id, module_id, "the hub is stopping")
        route = self.online(device_id, module_id)
        if route is None:
            await self._check_exists(device_id, module_id)
            if self._remote is not None:
                return await self._invoke_anywhere(self._remote, device_id, module_id, name, body,
                                                   response_s, connect_s)
            route = await self._wait_online(device_id, module_id, connect_s)
        return await self._send(route, device_id, module_id, name, body, response_s)

    async def invoke_local(self, device_id: str, module_id: str | None, method_name: str, body: bytes,
                           response_timeout_s: int) -> MethodResult | None:
        """Another hub node's call for an identity that should be connected here: None when it is
        not online for methods in this process (never asks the other nodes back); not audited (the
        calling node audits)."""
        if self._closed:
            return None
        route = self.online(device_id, module_id)
        if route is None:
            return None
        return await self._send(route, device_id, module_id, method_name, body, response_timeout_s)

    async def _invoke_anywhere(self, remote: RemoteMethods, device_id: str, module_id: str | None,
                               name: str, body: bytes, response_s: int, connect_s: int) -> MethodResult:
        """This node first, then the node holding the identity; until `connect_s` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_s
        while True:
            route = self.online(device_id, module_id)
            if route is not None:
                return await self._send(route, device_id, module_id, name, body, response_s)
            result = await remote.invoke(device_id, module_id, name, body, response_s)
            if result is not None:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                why = "not connected or not subscribed to methods"
                raise _not_online(device_id, module_id, why + (f" within {connect_s} s" if connect_s else ""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._online_changed.wait(), min(remaining, REMOTE_POLL_S))

    async def _send(self, handle: ConnectionHandle, device_id: str,
                    module_id: str | None, name: str, body: bytes, response_s: int) -> MethodResult:
        """One request on a local connection and its answer (or 404 / 504)."""
        rid = f"{next(self._rids):x}"
        key = (device_id, module_id, rid)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[MethodResult] = loop.create_future()
        self._pending[key] = answer
        closed: asyncio.Task[None] | None = None
        try:
            try:
                await handle.send_method_request(name, rid, body)
            except ConnectionError:
                raise _not_online(device_id, module_id, "the connection closed") from None
            closed = loop.create_task(handle.wait_closed())
            waiters: set[asyncio.Future[Any]] = {answer, closed}
            await asyncio.wait(waiters, timeout=response_s, return_when=asyncio.FIRST_COMPLETED)
            if answer.done() and not answer.cancelled():
                return answer.result()
            if answer.cancelled():
                raise _not_online(device_id, module_id, "the hub is stopping")
            if closed.done():
                raise _not_online(device_id, module_id, "the device disconnected before answering")
            raise GatewayTimeout(
                f"device {device_id} did not answer method {name!r} within {response_s} s",
                code="GatewayTimeout",
            )
        finally:
            self._pending.pop(key, None)
            if not answer.done():
                answer.cancel()
            if closed is not None and not closed.done():
                closed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closed

    async def _check_exists(self, device_id: str, module_id: str | None) -> None:
        if self._registry is not None and await self._registry.find(device_id) is None:
            raise NotFound(f"device {device_id} not found", code="DeviceNotFound", field="deviceId")
        if (module_id is not None and self._modules is not None
                and await self._modules.find_module(device_id, module_id) is None):
            raise module_not_found(device_id, module_id)

    async def _wait_online(
        self, device_id: str, module_id: str | None, connect_s: int
    ) -> ConnectionHandle:
        """Wait for the identity to be connected and subscribed. Subscriptions wake us at once;
        a reconnect of an already subscribed identity is seen by a cheap presence poll."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_s
        while True:
            route = self.online(device_id, module_id)
            if route is not None:
                return route
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                why = "not connected or not subscribed to methods"
                raise _not_online(device_id, module_id, why + (f" within {connect_s} s" if connect_s else ""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._online_changed.wait(), min(remaining, ONLINE_POLL_S))

    async def _record(self, actor: str | None, device_id: str, module_id: str | None, name: str,
                      outcome: str, *, status: int | None = None, reason: str | None = None) -> None:
        if self._audit is None or actor is None:
            return
        details: dict[str, Any] = {"method": name}
        if module_id is not None:
            details["moduleId"] = module_id
        if status is not None:
            details["status"] = status
        try:
            await self._audit.record("method.invoke", outcome, principal=actor, target=device_id,
                                     reason=reason, details=details)
        except Exception:  # the call itself happened; a failed audit write must not change its answer
            log.exception("audit of method.invoke failed")

    async def close(self) -> None:
        """Fail every pending call (404 DeviceNotOnline): the hub is stopping."""
        self._closed = True
        self._wake()
        for answer in list(self._pending.values()):
            if not answer.done():
                answer.cancel()
