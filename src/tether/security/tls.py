"""The one TLS layer of every Tether listener: pyOpenSSL in memory-BIO mode under an asyncio Protocol.

Why not stdlib `ssl` (docs/decisions/0002-tls-pyopenssl.md): it has no verify callback, so a
self-signed device certificate (Azure "selfSigned", known only by thumbprint) aborts the handshake.
Here the client certificate is requested, every chain is let through the handshake, and Tether's
authenticator decides afterwards from `get_extra_info("peercert_chain")`.

`TlsContextFactory` builds the one `SSL.Context` from settings and files and swaps it atomically on
`reload()` (SIGHUP): connections keep the context they started with, new ones get the new one.
`TlsProtocol` wraps any inner `asyncio.Protocol` (aiohttp's RequestHandler, the MQTT protocol, ...): the
inner protocol is created and sees `connection_made(TlsTransport)` only after the handshake succeeded.
Hot path: one `bio_write` per socket read, plaintext drained with 64 KB `recv` calls and handed over
in one piece, writes made while handling received data (or in one loop iteration) are coalesced into
one `SSL_write` and one socket write.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from OpenSSL import SSL

from tether.config import DEFAULT_TLS12_CIPHERS, TlsSettings
from tether.security.admission import ConnectionSlots, Slot
from tether.security.listener import Listener, start_listener

__all__ = [
    "LEGACY_TLS10_CIPHERS",
    "TlsContextFactory",
    "TlsProtocol",
    "TlsStats",
    "TlsTransport",
    "start_tls_server",
]

log = logging.getLogger(__name__)

READ_CHUNK = 65536  # plaintext per recv() and ciphertext per bio_read()
FLUSH_THRESHOLD = 65536  # pending plaintext above this is encrypted and sent at once (flow control)

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
# The only forward-secret suites a TLS 1.0/1.1 client can negotiate (CBC with SHA-1 MAC). Added to the
# default list only when an operator opts into legacy versions.
LEGACY_TLS10_CIPHERS = (
    "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA"
)
_OP_NO_RENEGOTIATION: int = getattr(SSL, "OP_NO_RENEGOTIATION", 0)


@dataclass(slots=True)
class TlsStats:
    """Counters for metrics; one instance per context factory, shared by all its connections."""

    handshakes: int = 0
    handshake_failures: int = 0
    handshake_timeouts: int = 0
    reloads: int = 0
    reload_failures: int = 0


def _accept_any_certificate(_conn: Any, _cert: Any, _errno: int, _depth: int, _ok: int) -> bool:
    """Let every client chain through the handshake; X509Verifier decides after it."""
    return True


class TlsContextFactory:
    """Builds Tether's single server `SSL.Context` and swaps it atomically on `reload()`."""

    def __init__(
        self,
        settings: TlsSettings,
        cert_file: Path | str,
        key_file: Path | str,
        chain_file: Path | str | None = None,
    ) -> None:
        self.settings = settings
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        chain_file = chain_file if chain_file is not None else settings.chain_file
        self.chain_file = Path(chain_file) if chain_file is not None else None
        self.stats = TlsStats()
        self.generation = 1
        if settings.min_version in ("TLSv1", "TLSv1.1"):
            log.warning(
                "TLS minimum version is %s: TLS 1.0/1.1 are deprecated (RFC 8996) and enabled only "
                "because tls.min_version asks for it",
                settings.min_version,
            )
        self._context, self._certificate = self._build()

    @property
    def context(self) -> SSL.Context:
        """The context new connections use (read once per accepted socket)."""
        return self._context

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate currently served."""
        return self._certificate

    def _cipher_list(self) -> str:
        ciphers = self.settings.ciphers
        if self.settings.min_version in ("TLSv1", "TLSv1.1"):
            if ciphers == DEFAULT_TLS12_CIPHERS:
                ciphers = f"{ciphers}:{LEGACY_TLS10_CIPHERS}"
            # OpenSSL 3 refuses TLS 1.0/1.1 (MD5+SHA-1 handshake signatures) at security level >= 1.
            ciphers = f"{ciphers}:@SECLEVEL=0"
        return ciphers

    def _build(self) -> tuple[SSL.Context, x509.Certificate]:
        certs = x509.load_pem_x509_certificates(self.cert_file.read_bytes())
        if self.chain_file is not None:
            certs += x509.load_pem_x509_certificates(self.chain_file.read_bytes())
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_VERSIONS[self.settings.min_version])
        ctx.set_options(
            SSL.OP_NO_SSLv2
            | SSL.OP_NO_SSLv3
            | SSL.OP_CIPHER_SERVER_PREFERENCE
            | SSL.OP_NO_COMPRESSION
            | _OP_NO_RENEGOTIATION
            | SSL.OP_SINGLE_ECDH_USE
        )
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections give their 34 KB buffers back
        ctx.set_cipher_list(self._cipher_list().encode("ascii"))
        ctx.set_tls13_ciphersuites(self.settings.tls13_ciphersuites.encode("ascii"))
        # ECDHE groups: OpenSSL's defaults (X25519 and P-256 first; pyOpenSSL 25 cannot set a list).
        ctx.use_certificate(certs[0])
        for extra in certs[1:]:
            if extra != certs[0]:
                ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey_file(str(self.key_file))
        ctx.check_privatekey()
        ctx.set_session_id(b"tether")  # required for session resumption when client certs are requested
        if self.settings.request_client_cert:
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept_any_certificate)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        return ctx, certs[0]

    def reload(self) -> None:
        """Re-read the certificate, key and chain files and use them for new connections.

        On any error the old context stays in use and the error propagates."""
        try:
            context, certificate = self._build()
        except Exception:
            self.stats.reload_failures += 1
            raise
        self._context, self._certificate = context, certificate  # one reference swap
        self.generation += 1
        self.stats.reloads += 1
        log.info("TLS context reloaded (generation %d) from %s", self.generation, self.cert_file)

    def _on_sighup(self) -> None:
        try:
            self.reload()
        except Exception:
            log.exception("TLS reload on SIGHUP failed; still serving the previous certificate")

    def install_sighup_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def remove_sighup_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_signal_handler(signal.SIGHUP)


def _name_tuple(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
    out = []
    for rdn in name.rdns:
        out.append(tuple((getattr(a.oid, "_name", a.oid.dotted_string), str(a.value)) for a in rdn))
    return tuple(out)


def _cert_dict(cert: x509.Certificate) -> dict[str, Any]:
    """The shape of stdlib `SSLSocket.getpeercert()`, for code written against it."""
    fmt = "%b %d %H:%M:%S %Y GMT"
    info: dict[str, Any] = {
        "subject": _name_tuple(cert.subject),
        "issuer": _name_tuple(cert.issuer),
        "version": cert.version.value + 1,
        "serialNumber": format(cert.serial_number, "X"),
        "notBefore": cert.not_valid_before_utc.strftime(fmt),
        "notAfter": cert.not_valid_after_utc.strftime(fmt),
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return info
    alt: list[tuple[str, str]] = [("DNS", v) for v in san.get_values_for_type(x509.DNSName)]
    alt += [("IP Address", str(v)) for v in san.get_values_for_type(x509.IPAddress)]
    alt += [("URI", v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    info["subjectAltName"] = tuple(alt)
    return info


class TlsProtocol(asyncio.Protocol):
    """Server-side TLS over a raw socket transport; the inner protocol sees only plaintext.

    `protocol_factory` is called once the handshake has succeeded (a failed or timed-out handshake
    never creates an inner protocol)."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        context: SSL.Context,
        *,
        handshake_timeout: float = 10.0,
        stats: TlsStats | None = None,
        slot: Slot | None = None,
    ) -> None:
        self._factory = protocol_factory
        self._slot = slot
        self.context = context
        self._handshake_timeout = handshake_timeout
        self.stats = stats if stats is not None else TlsStats()
        self._conn: Any = None  # SSL.Connection
        self._raw: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: asyncio.Protocol | None = None
        self._transport: TlsTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handshaking = True
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._delivering = False
        self._flush_scheduled = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._chain: list[x509.Certificate] | None = None

    # --- raw transport side -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        self._loop = asyncio.get_running_loop()
        conn = SSL.Connection(self.context, None)
        conn.set_accept_state()
        self._conn = conn
        self._timer = self._loop.call_later(self._handshake_timeout, self._on_handshake_timeout)
        if self._slot is not None:
            self._slot.attach(self._shed)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._conn.bio_write(data)
        except SSL.Error as exc:
            self._fail(exc)
            return
        if self._handshaking and not self._do_handshake():
            return
        if not self._reading_paused:
            self._read_plaintext()

    def eof_received(self) -> bool | None:
        # TCP FIN without close_notify: tell the inner protocol, then close (no TLS half-close).
        if self._app is not None and not self._closing:
            self._app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self._cancel_timer()
        if self._slot is not None:
            self._slot.release()
        self._pending.clear()
        app, self._app = self._app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._app is not None:
            self._app.resume_writing()

    # --- handshake --------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if self._handshaking and not self._closing and self._raw is not None:
            self.stats.handshake_timeouts += 1
            log.debug("TLS handshake from %s timed out", self._raw.get_extra_info("peername"))
            self._closing = True
            self._raw.abort()

    def _do_handshake(self) -> bool:
        """Advance the handshake; True once it is complete and the inner protocol is connected."""
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush_ciphertext()
            return False
        except SSL.Error as exc:
            self._flush_ciphertext()  # the alert tells the client why
            self.stats.handshake_failures += 1
            self._fail(exc)
            return False
        self._handshaking = False
        self._cancel_timer()
        self.stats.handshakes += 1
        self._flush_ciphertext()  # TLS 1.3 session tickets
        self._transport = TlsTransport(self)
        app = self._factory()
        self._app = app
        app.connection_made(self._transport)
        if self._writing_paused and self._app is app:
            app.pause_writing()
        return not self._closing

    def _shed(self) -> None:
        """Closed to make room for a new connection (`tether.security.admission`)."""
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def _fail(self, exc: Exception) -> None:
        if self._raw is not None:
            log.debug("TLS error from %s: %s", self._raw.get_extra_info("peername"), exc)
            self._closing = True
            self._raw.close()  # sends what is buffered (an alert), then closes

    # --- plaintext in -----------------------------------------------------------------------

    def _read_plaintext(self) -> None:
        conn = self._conn
        chunks: list[bytes] = []
        eof = False
        while True:
            try:
                chunks.append(conn.recv(READ_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                eof = True
                break
            except SSL.Error as exc:
                self._flush_ciphertext()
                self._fail(exc)
                return
        self._flush_ciphertext()  # post-handshake replies (KeyUpdate) if any
        if chunks and self._app is not None:
            self._delivering = True
            try:
                self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            finally:
                self._delivering = False
            self._flush_plaintext()  # everything the inner protocol wrote in reply, in one record run
        if eof and not self._closing:
            if self._app is not None:
                self._app.eof_received()
            self._close()

    def _resume_read(self) -> None:
        if not self._closing and not self._handshaking and not self._reading_paused:
            self._read_plaintext()

    # --- plaintext out ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._closing:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_THRESHOLD:
            self._flush_plaintext()
        elif not self._delivering and not self._flush_scheduled:
            assert self._loop is not None
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush_plaintext()

    def _flush_plaintext(self) -> None:
        if not self._pending or self._lost:
            return
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_size = 0
        try:
            self._conn.sendall(data)
        except SSL.Error as exc:
            self._fail(exc)
            return
        self._flush_ciphertext()

    def _flush_ciphertext(self) -> None:
        """Move every encrypted byte from the memory BIO to the socket in one write."""
        conn, raw = self._conn, self._raw
        out: list[bytes] = []
        while True:
            try:
                data = conn.bio_read(READ_CHUNK)
            except SSL.WantReadError:
                break
            out.append(data)
            if len(data) < READ_CHUNK:
                break  # a memory BIO returns everything it has up to the size asked for
        if out and raw is not None and not self._lost:
            raw.write(out[0] if len(out) == 1 else b"".join(out))

    # --- called by TlsTransport ---------------------------------------------------------------

    def _close(self) -> None:
        if self._closing:
            return
        self._flush_plaintext()
        self._closing = True
        self._cancel_timer()
        try:
            self._conn.shutdown()  # queue close_notify
        except SSL.Error:
            pass
        self._flush_ciphertext()
        if self._raw is not None:
            self._raw.close()

    def _abort(self) -> None:
        self._closing = True
        self._pending.clear()
        if self._raw is not None:
            self._raw.abort()

    def _pause_reading(self) -> None:
        self._reading_paused = True
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()
        if self._loop is not None:
            self._loop.call_soon(self._resume_read)  # plaintext may be waiting in the SSL buffer

    def _peer_chain(self) -> list[x509.Certificate]:
        if self._chain is None:
            leaf = self._conn.get_peer_certificate(as_cryptography=True)
            rest = self._conn.get_peer_cert_chain(as_cryptography=True) or []
            if leaf is None:
                self._chain = []
            else:  # server side: OpenSSL's peer chain excludes the leaf (client side includes it)
                self._chain = [leaf, *(c for c in rest if c != leaf)]
        return self._chain

    def _extra(self, name: str, default: Any) -> Any:
        conn = self._conn
        if name == "peercert_chain":
            return self._peer_chain()
        if name == "peercert":
            chain = self._peer_chain()
            return _cert_dict(chain[0]) if chain else None
        if name == "ssl_object":
            return conn
        if name == "sslcontext":
            return self.context
        if name == "cipher":
            return (conn.get_cipher_name(), conn.get_cipher_version(), conn.get_cipher_bits())
        if name == "tls_version":
            return conn.get_protocol_version_name()
        if name == "compression":
            return None
        if name == "connection_slot":
            return self._slot
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)


class TlsTransport(asyncio.Transport):
    """What the inner protocol sees: an `asyncio.Transport` carrying plaintext."""

    def __init__(self, tls: TlsProtocol) -> None:
        super().__init__()
        self._tls = tls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls._extra(name, default)

    def is_closing(self) -> bool:
        raw = self._tls._raw
        return self._tls._closing or raw is None or raw.is_closing()

    def close(self) -> None:
        self._tls._close()

    def abort(self) -> None:
        self._tls._abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._tls._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        app = self._tls._app
        assert app is not None
        return app

    def is_reading(self) -> bool:
        return not (self._tls._reading_paused or self._tls._closing)

    def pause_reading(self) -> None:
        self._tls._pause_reading()

    def resume_reading(self) -> None:
        self._tls._resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._tls._raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._tls._raw
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def get_write_buffer_size(self) -> int:
        raw = self._tls._raw
        return self._tls._pending_size + (raw.get_write_buffer_size() if raw is not None else 0)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._tls._write(data if isinstance(data, bytes) else bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot half-close")


async def start_tls_server(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str | None,
    port: int,
    factory: TlsContextFactory,
    *,
    handshake_timeout: float = 10.0,
    backlog: int = 1024,
    reuse_port: bool | None = None,
    slots: ConnectionSlots | None = None,
    name: str = "tls",
) -> Listener:
    """Listen on host:port; every accepted socket gets a TlsProtocol with the factory's current context.

    Works with any protocol factory, e.g. aiohttp: `runner = web.AppRunner(app); await runner.setup();
    await start_tls_server(runner.server, host, port, factory)`. With `slots`, every socket is admitted
    by them first and the inner protocol finds its slot as `get_extra_info("connection_slot")`."""

    def make(slot: Slot | None) -> TlsProtocol:
        return TlsProtocol(protocol_factory, factory.context, handshake_timeout=handshake_timeout,
                           stats=factory.stats, slot=slot)

    return await start_listener(name, make, host, port, slots=slots, backlog=backlog, reuse_port=reuse_port)
