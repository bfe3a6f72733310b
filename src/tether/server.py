"""`tether run`: open the hub, start every listener, serve until SIGINT/SIGTERM.

Listeners: MQTT over TLS (`listeners.mqtt_port`), AMQP over TLS (`listeners.amqp_port`), the HTTPS
server carrying the service REST API, the device HTTPS surface, MQTT and AMQP over WebSockets and
`/metrics` (`listeners.https_port`, 443 by
default: the port Microsoft's SDKs dial), and — only when configured — plain-TCP MQTT for loopback
testing. All TLS goes through one TlsContextFactory; every socket is admitted by the hub's
`ConnectionSlots`, whose budget is the descriptor limit (raised to the hard limit at start) minus what
is open minus `limits.fd_reserve`.

Port 443 needs a privilege on Linux (root, `CAP_NET_BIND_SERVICE`, or a lowered
`net.ipv4.ip_unprivileged_port_start`). Without it the HTTPS listener binds
`listeners.https_fallback_port` (8443) instead and one warning line says what to do; the hub works,
only SDKs that cannot take a port in `HostName` need 443 (docs/deployment.md, "Port 443"). Once the
listeners are bound, `{data_dir}/run/hub.json` says where they are (for the CLI, `tether.runfile`).

The start-up output names the listeners, never a key: the owner connection string is printed by
`tether init` and on request (`tether policy connection-string iothubowner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from tether.config import ConfigError, Settings
from tether.hub import Hub
from tether.runfile import Listening, remove_run_file, write_run_file

log = logging.getLogger("tether.server")
READY_LINE = "Tether hub ready"

PORT_443_HINT = (f"run `sudo setcap cap_net_bind_service=+ep {os.path.realpath(sys.executable)}` or "
                 "`sudo sysctl -w net.ipv4.ip_unprivileged_port_start=443`")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def http_app(hub: Hub) -> web.Application:
    """The HTTPS listener's application: the API's features (`api.app.FEATURES`) plus the web
    console's when `operators.console` is on. Composed here, above both packages, so that the API
    never imports the console (the console uses the API's modules)."""
    from tether.api.app import FEATURES, build_app

    features = FEATURES
    if hub.settings.operators.console:
        from tether.console import FEATURE as CONSOLE

        features = (*FEATURES, CONSOLE)
    return build_app(hub, features)


async def start_listeners(hub: Hub) -> None:
    """Start every configured listener on `hub`; fills `hub.ports` with the bound ports."""
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
    runner = web.AppRunner(http_app(hub), access_log=None, handle_signals=False)
    await runner.setup()
    listeners = settings.listeners
    try:
        https = await _bind("https_port", host, listeners.https_port,
                            lambda port: start_https(hub, runner, host, port, tls),
                            fallback=listeners.https_fallback_port)
    except BaseException:
        await runner.cleanup()
        raise
    hub.add_server("https", https, closer=runner.cleanup)

    mqtts = await _bind("mqtt_port", host, listeners.mqtt_port,
                        lambda port: start_mqtt(hub, host=host, port=port, tls=True))
    hub.add_server("mqtts", mqtts)
    if settings.listeners.amqp_port is not None:
        from tether.protocols.amqp.server import start_amqp, stop_amqp

        amqps = await _bind("amqp_port", host, settings.listeners.amqp_port,
                            lambda port: start_amqp(hub, host=host, port=port, tls=True))
        hub.add_server("amqps", amqps, closer=lambda: stop_amqp(hub))
    if settings.listeners.mqtt_plain_port is not None:
        # Unencrypted MQTT is for loopback testing only: it never binds a non-loopback address.
        plain_host = host if _is_loopback(host) else "127.0.0.1"
        plain = await start_mqtt(hub, host=plain_host, port=settings.listeners.mqtt_plain_port, tls=False)
        hub.add_server("mqtt", plain)


async def _bind(setting: str, host: str, port: int,
                start: Callable[[int], Awaitable[asyncio.AbstractServer]],
                *, fallback: int = 0) -> asyncio.AbstractServer:
    """Start a listener; name the setting when the port cannot be bound. A privileged port refused
    for lack of privilege uses `fallback` (when set), with one warning line saying how to get it."""
    try:
        return await start(port)
    except PermissionError:
        if not fallback or fallback == port:
            raise ConfigError(f"invalid setting listeners.{setting}: binding port {port} needs privileges "
                              f"({PORT_443_HINT})") from None
        server = await _bind(f"{setting.removesuffix('_port')}_fallback_port", host, fallback, start)
        log.warning("HTTPS is on port %d, not %d (binding it needs privileges): SDKs other than Python's "
                    "need %d, so %s and restart (docs/deployment.md, \"Port 443\")",
                    fallback, port, port, PORT_443_HINT)
        return server
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise ConfigError(f"invalid setting listeners.{setting}: cannot listen on {host}:{port}: "
                              f"{exc.strerror}") from None
        raise


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
        pid = os.getpid()
        try:
            write_run_file(settings.data_dir, Listening(pid, settings.listeners.host, settings.hub.hostname,
                                                        dict(hub.ports)))
        except OSError as exc:  # the CLI then falls back to the settings' address; the hub still runs
            log.warning("cannot write the run file in %s (%s): local CLI commands will use the configured "
                        "listener address", settings.data_dir, exc.strerror)
        try:
            _announce(hub, limit)
            if ready is not None:
                ready.set()
            await stop.wait()
            print("Tether hub stopping", file=sys.stderr, flush=True)
        finally:
            remove_run_file(settings.data_dir, pid)


def _announce(hub: Hub, descriptor_limit: int) -> None:
    """The listeners on stdout, never a key; the last line says the hub is up."""
    settings = hub.settings
    print(f"Tether hub '{settings.hub.hostname}' is running", flush=True)
    for name, port in hub.ports.items():
        print(f"  {name:6s} listening on {settings.listeners.host}:{port}", flush=True)
    if hub.cluster is not None:
        print(f"Cluster node {hub.node_id} (NATS subjects {hub.cluster.names.prefix}.*)", flush=True)
    print(f"  sockets: up to {hub.slots.capacity} (file descriptor limit {descriptor_limit}, "
          f"{settings.limits.fd_reserve} reserved), {settings.limits.max_connections_per_peer} per peer",
          flush=True)
    print(f"{READY_LINE} (owner connection string: tether policy connection-string iothubowner)", flush=True)


def run(settings: Settings) -> None:
    """Entry point used by the CLI: uvloop when available."""
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
