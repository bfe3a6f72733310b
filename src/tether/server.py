"""`tether run`: open the hub, start every listener, serve until SIGINT/SIGTERM.

Listeners: MQTT over TLS (`listeners.mqtt_port`), AMQP over TLS (`listeners.amqp_port`), the HTTPS
server carrying the service REST API, the device HTTPS surface, MQTT and AMQP over WebSockets and
`/metrics` (`listeners.https_port`), and — only when configured — plain-TCP MQTT for loopback testing.
All TLS goes through one TlsContextFactory; every socket is admitted by the hub's `ConnectionSlots`,
whose budget is the descriptor limit (raised to the hard limit at start) minus what is open minus
`limits.fd_reserve`.

The start-up output names the listeners, never a key: the owner connection string is printed by
`tether init` and on request (`tether policy connection-string iothubowner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys

from aiohttp import web

from tether.config import Settings
from tether.hub import Hub

log = logging.getLogger("tether.server")
READY_LINE = "Tether hub ready"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start_listeners(hub: Hub) -> None:
    """Start every configured listener on `hub`; fills `hub.ports` with the bound ports."""
    from tether.api.app import build_app
    from tether.api.server import start_https
    from tether.protocols.mqtt.server import start_mqtt
    from tether.security.admission import socket_capacity
    from tether.security.tls import TlsContextFactory

    settings = hub.settings
    host = settings.listeners.host
    tls = TlsContextFactory(settings.tls, settings.cert_file, settings.key_file, settings.tls.chain_file)
    hub.tls = tls
    if settings.legacy_tls:
        log.warning("TLS %s enabled by tls.min_version: legacy protocol versions are insecure",
                    settings.tls.min_version)

    hub.slots.capacity = socket_capacity(settings.limits.fd_reserve)  # what storage left us
    app = build_app(hub)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    https = await start_https(hub, runner, host, settings.listeners.https_port, tls)
    hub.add_server("https", https, closer=runner.cleanup)

    mqtts = await start_mqtt(hub, host=host, port=settings.listeners.mqtt_port, tls=True)
    hub.add_server("mqtts", mqtts)
    if settings.listeners.amqp_port is not None:
        from tether.protocols.amqp.server import start_amqp, stop_amqp

        amqps = await start_amqp(hub, host=host, port=settings.listeners.amqp_port, tls=True)
        hub.add_server("amqps", amqps, closer=lambda: stop_amqp(hub))
    if settings.listeners.mqtt_plain_port is not None:
        # Unencrypted MQTT is for loopback testing only: it never binds a non-loopback address.
        plain_host = host if _is_loopback(host) else "127.0.0.1"
        plain = await start_mqtt(hub, host=plain_host, port=settings.listeners.mqtt_plain_port, tls=False)
        hub.add_server("mqtt", plain)


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run the hub until a termination signal; SIGHUP reloads the TLS certificate."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tether.security.admission import raise_descriptor_limit

    before, limit = raise_descriptor_limit()
    if limit > before:
        log.info("file descriptor limit raised from %d to %d (the hard limit)", before, limit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with Hub(settings) as hub:
        await start_listeners(hub)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, hub.reload_tls)
        print(f"Tether hub '{settings.hub.hostname}' is running", flush=True)
        for name, port in hub.ports.items():
            print(f"  {name:6s} listening on {settings.listeners.host}:{port}", flush=True)
        if hub.cluster is not None:
            print(f"Cluster node {hub.node_id} (NATS subjects {hub.cluster.names.prefix}.*)", flush=True)
        print(f"  sockets: up to {hub.slots.capacity} (file descriptor limit {limit}, "
              f"{settings.limits.fd_reserve} reserved), {settings.limits.max_connections_per_peer} per peer",
              flush=True)
        print(f"{READY_LINE} (owner connection string: tether policy connection-string iothubowner)",
              flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        print("Tether hub stopping", file=sys.stderr, flush=True)


def run(settings: Settings) -> None:
    """Entry point used by the CLI: uvloop when available."""
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
