"""The pyOpenSSL memory-BIO adapter on real sockets: echo, extra info, refusals, timeouts, hot reload."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from tls_helpers import DevPki, EchoProtocol, client_context, close_writer, echo_roundtrip, echo_server

from tether.config import TlsSettings
from tether.security import pki
from tether.security.tls import TlsContextFactory, TlsTransport


async def test_echo_small_and_large_payloads(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        assert await echo_roundtrip(reader, writer, b"hello") == b"hello"
        big = bytes(range(256)) * 8192  # 2 MiB: many records, flow control on both sides
        assert await echo_roundtrip(reader, writer, big) == big
        await close_writer(writer)


async def test_inner_protocol_sees_tls_extra_info_and_client_chain(dev_pki: DevPki) -> None:
    cert, key = pki.issue_device_cert("dev-1", self_signed=True)
    ctx = client_context(dev_pki.files.root_cert, identity=dev_pki.identity("dev-1", cert, key))
    async with echo_server(dev_pki.factory()) as srv:
        _reader, writer = await srv.connect(ctx)
        transport = await srv.next_transport()
        assert isinstance(transport, TlsTransport)
        assert transport.get_extra_info("tls_version") == "TLSv1.3"
        name, version, bits = transport.get_extra_info("cipher")
        assert name.startswith("TLS_") and version == "TLSv1.3" and bits >= 128
        assert transport.get_extra_info("sslcontext") is not None
        assert isinstance(transport.get_extra_info("ssl_object"), SSL.Connection)
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert transport.get_extra_info("sockname")[1] == srv.port
        assert transport.get_extra_info("socket") is not None
        assert transport.get_extra_info("compression") is None
        assert transport.get_extra_info("peercert_chain") == [cert]
        peercert = transport.get_extra_info("peercert")
        assert peercert["subject"] == ((("commonName", "dev-1"),),)
        assert ("DNS", "dev-1") in peercert["subjectAltName"]
        assert not transport.can_write_eof()
        assert transport.get_write_buffer_size() == 0
        await close_writer(writer)


async def test_client_without_certificate_gets_through_with_empty_chain(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        transport = await srv.next_transport()
        assert transport.get_extra_info("peercert_chain") == []
        assert transport.get_extra_info("peercert") is None
        assert await echo_roundtrip(reader, writer, b"x") == b"x"
        await close_writer(writer)


async def test_client_chain_is_leaf_first(dev_pki: DevPki) -> None:
    inter, inter_key = pki.issue_intermediate_ca("Device CA", dev_pki.root, dev_pki.root_key)
    cert, key = pki.issue_device_cert("dev-2", ca_cert=inter, ca_key=inter_key)
    ctx = client_context(
        dev_pki.files.root_cert, identity=dev_pki.identity("dev-2", cert, key), chain=[inter]
    )
    async with echo_server(dev_pki.factory()) as srv:
        _reader, writer = await srv.connect(ctx)
        transport = await srv.next_transport()
        assert transport.get_extra_info("peercert_chain") == [cert, inter]
        await close_writer(writer)


async def test_tls12_client_is_served_with_ecdhe_aead(dev_pki: DevPki) -> None:
    ctx = client_context(dev_pki.files.root_cert, version=ssl.TLSVersion.TLSv1_2)
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(ctx)
        transport = await srv.next_transport()
        assert transport.get_extra_info("tls_version") == "TLSv1.2"
        assert transport.get_extra_info("cipher")[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"  # server preference
        assert await echo_roundtrip(reader, writer, b"tls12") == b"tls12"
        await close_writer(writer)


async def test_tls10_client_is_refused_by_default_and_accepted_when_opted_in(dev_pki: DevPki) -> None:
    def legacy_client() -> ssl.SSLContext:
        ctx = client_context(
            dev_pki.files.root_cert, version=ssl.TLSVersion.TLSv1, ciphers="DEFAULT:@SECLEVEL=0"
        )
        return ctx

    factory = dev_pki.factory()
    async with echo_server(factory) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await srv.connect(legacy_client())
        await asyncio.sleep(0.05)
        assert factory.stats.handshake_failures == 1
        assert factory.stats.handshakes == 0

    async with echo_server(dev_pki.factory(min_version="TLSv1")) as srv:
        reader, writer = await srv.connect(legacy_client())
        transport = await srv.next_transport()
        assert transport.get_extra_info("tls_version") == "TLSv1"
        assert transport.get_extra_info("cipher")[0].startswith("ECDHE-")
        assert await echo_roundtrip(reader, writer, b"old") == b"old"
        await close_writer(writer)


def _rsa_server_identity(dev_pki: DevPki) -> tuple[str, str]:
    """An RSA server certificate, so that RSA key exchange would be possible if the suites allowed it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC) - timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(dev_pki.root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(dev_pki.root_key, hashes.SHA256())
    )
    cert_path, key_path = dev_pki.dir / "rsa.pem", dev_pki.dir / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


async def test_rsa_key_exchange_only_client_is_refused(dev_pki: DevPki) -> None:
    cert_file, key_file = _rsa_server_identity(dev_pki)
    factory = TlsContextFactory(TlsSettings(), cert_file, key_file)
    async with echo_server(factory) as srv:
        rsa_kex = client_context(
            dev_pki.files.root_cert, version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256"
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await srv.connect(rsa_kex)
        # Control: the same RSA certificate with a forward-secret suite works.
        ecdhe = client_context(
            dev_pki.files.root_cert, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256"
        )
        reader, writer = await srv.connect(ecdhe)
        assert await echo_roundtrip(reader, writer, b"ok") == b"ok"
        await close_writer(writer)


async def test_half_open_handshake_is_closed_after_timeout(dev_pki: DevPki) -> None:
    factory = dev_pki.factory()
    async with echo_server(factory, handshake_timeout=0.3) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # plain TCP, says nothing
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert factory.stats.handshake_timeouts == 1
        assert srv.transports.empty()  # no inner protocol was ever created
        writer.close()


async def test_garbage_instead_of_client_hello_is_refused_and_counted(dev_pki: DevPki) -> None:
    factory = dev_pki.factory()
    async with echo_server(factory) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 3)  # the server closes (possibly after an alert)
        assert factory.stats.handshake_failures == 1
        writer.close()


async def test_server_close_sends_close_notify(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        transport = await srv.next_transport()
        transport.write(b"bye")
        transport.close()
        assert transport.is_closing()
        # A clean TLS close reads as EOF; a TCP close without close_notify would raise SSLError here.
        assert await asyncio.wait_for(reader.read(), 3) == b"bye"
        await close_writer(writer)


async def test_pause_and_resume_reading_hold_back_plaintext(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        transport = await srv.next_transport()
        transport.pause_reading()
        assert not transport.is_reading()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.2)
        transport.resume_reading()
        assert await asyncio.wait_for(reader.readexactly(4), 3) == b"held"
        await close_writer(writer)


async def test_hot_reload_serves_new_cert_to_new_connections_only(dev_pki: DevPki) -> None:
    factory = dev_pki.factory()
    ctx = client_context(dev_pki.files.root_cert)
    async with echo_server(factory) as srv:
        reader1, writer1 = await srv.connect(ctx)
        old_der = writer1.get_extra_info("ssl_object").getpeercert(binary_form=True)

        new_cert, new_key = pki.issue_server_cert(
            ["localhost"], ["127.0.0.1"], dev_pki.root, dev_pki.root_key
        )
        pki.write_private_key(dev_pki.files.server_key, new_key)
        pki.write_certificates(dev_pki.files.server_cert, [new_cert])
        factory.reload()
        assert factory.generation == 2 and factory.certificate == new_cert

        reader2, writer2 = await srv.connect(ctx)
        new_der = writer2.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert new_der == new_cert.public_bytes(serialization.Encoding.DER)
        assert new_der != old_der
        assert (
            await echo_roundtrip(reader1, writer1, b"old connection still works")
            == b"old connection still works"
        )
        assert await echo_roundtrip(reader2, writer2, b"new") == b"new"
        await close_writer(writer1)
        await close_writer(writer2)


async def test_failed_reload_keeps_serving_the_old_certificate(dev_pki: DevPki) -> None:
    factory = dev_pki.factory()
    before = factory.context
    dev_pki.files.server_key.write_text("not a key")
    with pytest.raises(SSL.Error):
        factory.reload()
    assert factory.context is before
    assert factory.stats.reload_failures == 1
    async with echo_server(factory) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        assert await echo_roundtrip(reader, writer, b"still up") == b"still up"
        await close_writer(writer)


async def test_sighup_reloads(dev_pki: DevPki) -> None:
    import os
    import signal

    factory = dev_pki.factory()
    loop = asyncio.get_running_loop()
    factory.install_sighup_handler(loop)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(50):
            if factory.generation == 2:
                break
            await asyncio.sleep(0.02)
        assert factory.generation == 2
    finally:
        factory.remove_sighup_handler(loop)


def _echo(transport: asyncio.Transport) -> EchoProtocol:
    protocol = transport.get_protocol()
    assert isinstance(protocol, EchoProtocol)
    return protocol


async def test_writes_from_other_tasks_are_flushed(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        transport = await srv.next_transport()
        transport.write(b"push-1;")
        transport.writelines([b"push-2;", bytearray(b"push-3;"), memoryview(b"push-4")])
        assert await asyncio.wait_for(reader.readexactly(27), 3) == b"push-1;push-2;push-3;push-4"
        await close_writer(writer)


async def test_slow_reader_pauses_and_resumes_the_inner_protocol(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        transport = await srv.next_transport()
        protocol = _echo(transport)
        chunk = b"p" * 65536
        total = 0
        while "pause_writing" not in protocol.events and total < 64 * 1024 * 1024:
            transport.write(chunk)
            total += len(chunk)
            await asyncio.sleep(0)
        assert "pause_writing" in protocol.events
        assert transport.get_write_buffer_size() > 0
        received = 0
        while received < total:
            received += len(await asyncio.wait_for(reader.read(1 << 20), 5))
        assert protocol.events[-1] == "resume_writing"
        await close_writer(writer)


async def test_client_close_reaches_the_inner_protocol(dev_pki: DevPki) -> None:
    async with echo_server(dev_pki.factory()) as srv:
        _reader, writer = await srv.connect(client_context(dev_pki.files.root_cert))
        transport = await srv.next_transport()
        protocol = _echo(transport)
        await close_writer(writer)
        assert await asyncio.wait_for(protocol.lost, 3) is None
        assert protocol.events[0] == "eof" and protocol.events[-1] == "lost"
        assert transport.is_closing()


def test_adapter_runs_on_uvloop(dev_pki: DevPki) -> None:
    """The hub may run on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def scenario() -> bytes:
        cert, key = pki.issue_device_cert("dev-uv", self_signed=True)
        ctx = client_context(dev_pki.files.root_cert, identity=dev_pki.identity("dev-uv", cert, key))
        async with echo_server(dev_pki.factory()) as srv:
            reader, writer = await srv.connect(ctx)
            transport = await srv.next_transport()
            assert transport.get_extra_info("peercert_chain") == [cert]
            data = await echo_roundtrip(reader, writer, b"uv" * 100_000)
            await close_writer(writer)
            return data

    assert uvloop.run(scenario()) == b"uv" * 100_000
