"""`tether cluster --nodes N`: N local `tether run` processes on PostgreSQL + NATS, for trying scale-out.

Each node gets its own config file and data dir under `{data_dir}/cluster/node-{i}`, the shared dev PKI
of the data dir, the same database, stream and cluster subjects, a node id `node-{i}` and its own ports
(`--base-port B`: node i listens on B+10i (HTTPS), B+10i+1 (MQTT/TLS), B+10i+2 (plain MQTT with
`--plain-mqtt`), B+10i+3 (AMQP/TLS); without it, ephemeral ports). The database is created when
missing and migrated once before the nodes start (so they do not race to create the default policies).
Ctrl-C stops them all.

`write_node_config` and `NodeProcess` are also what the three-node test uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from tether.cli.context import cli_errors, state_of
from tether.config import Settings, load_settings
from tether.errors import BadRequest

__all__ = ["NodeProcess", "NodeSpec", "cluster_command", "prepare_storage", "render_toml", "stop_all",
           "write_node_config"]

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/tether_cluster"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
READY_LINE = "Tether hub ready"  # tether.server.READY_LINE (not imported: the CLI stays light)


@dataclass
class NodeSpec:
    """One node's files and the settings tables written into its config."""

    node_id: str
    data_dir: Path
    tables: dict[str, dict[str, Any]]

    @property
    def config(self) -> Path:
        return self.data_dir / "tether.toml"


def render_toml(tables: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = {json.dumps(str(value))}")  # a TOML basic string
        lines.append("")
    return "\n".join(lines)


def write_node_config(spec: NodeSpec) -> Path:
    """Create the node's data dir (owner only) and write its TOML config; returns the config path."""
    spec.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec.config.write_text(render_toml(spec.tables), encoding="utf-8")
    return spec.config


def node_specs(base: Settings, root: Path, count: int, *, base_port: int | None, database_url: str,
               stream_url: str, nats_url: str, prefix: str, plain_mqtt: bool) -> list[NodeSpec]:
    """The N nodes' settings: shared hostname, TLS files, storage and cluster subjects."""
    specs = []
    for i in range(count):
        ports = (0, 0, 0, 0) if base_port is None else tuple(base_port + 10 * i + k for k in range(4))
        node_id = f"node-{i}"
        specs.append(NodeSpec(node_id, root / node_id, {
            "hub": {"hostname": base.hub.hostname, "data_dir": str((root / node_id).resolve())},
            "listeners": {"host": base.listeners.host, "https_port": ports[0], "mqtt_port": ports[1],
                          "mqtt_plain_port": ports[2] if plain_mqtt else None, "amqp_port": ports[3]},
            "tls": {"cert_file": str(base.cert_file.resolve()), "key_file": str(base.key_file.resolve())},
            "storage": {"database_url": database_url, "stream_url": stream_url,
                        "stream_partitions": base.storage.stream_partitions},
            "cluster": {"nats_url": nats_url, "node_id": node_id, "subject_prefix": prefix},
        }))
    return specs


async def prepare_storage(settings: Settings, *, create_database: bool = True) -> str:
    """Create the PostgreSQL database if missing, run the migrations and create the default policies
    once, before several nodes start on it; returns the owner (iothubowner) connection string, which
    the nodes themselves never print."""
    from sqlalchemy.engine import make_url

    from tether.cli.local import LocalServices

    url = make_url(settings.database_url)
    if create_database and url.get_backend_name() == "postgresql" and url.database:
        import asyncpg  # type: ignore[import-untyped]

        admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.database)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{url.database}"')
        finally:
            await conn.close()
    from tether.cli.policies import service_connection_string

    services = LocalServices(settings)
    await services.open(ensure_defaults=True)
    try:
        owner = await services.policies.get("iothubowner")
    finally:
        await services.close()
    return service_connection_string(settings.hub.hostname, owner)


def _child_env(config: Path) -> dict[str, str]:
    """The parent's environment without TETHER_* settings (they would override every node's file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_CONFIG"] = str(config)
    return env


@dataclass
class NodeProcess:
    """`tether run` for one node spec, its output in `{data_dir}/node.out|err`."""

    spec: NodeSpec
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    connection_string: str = ""

    @property
    def out_file(self) -> Path:
        return self.spec.data_dir / "node.out"

    @property
    def err_file(self) -> Path:
        return self.spec.data_dir / "node.err"

    def start(self) -> None:
        self.ports = {}
        with self.out_file.open("wb") as out, self.err_file.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tether.cli.main", "--config", str(self.spec.config), "run"],
                stdout=out, stderr=err, env=_child_env(self.spec.config), cwd=str(self.spec.data_dir),
                start_new_session=True)  # Ctrl-C reaches the launcher only; it stops the nodes in order

    def ready(self) -> bool:
        """True once the node printed its ports and that it is ready; raises if it exited."""
        text = self.out_file.read_text(errors="replace") if self.out_file.exists() else ""
        if READY_LINE in text and text.endswith("\n"):
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 4 and parts[1:3] == ["listening", "on"]:
                    self.ports[parts[0]] = int(parts[3].rsplit(":", 1)[1])
            return True
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.spec.node_id} exited with {self.proc.returncode}: "
                               f"{self.stderr_tail()}")
        return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.node_id} did not start: {self.stderr_tail()}")
            time.sleep(0.05)

    def stderr_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.err_file.read_text(errors="replace")[-n:]
        return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the hub closes its connections and leaves the cluster), SIGKILL after `timeout`."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        if node.running:
            assert node.proc is not None
            with contextlib.suppress(OSError):
                node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop()


def cluster_command(
    ctx: typer.Context,
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=32, help="How many hub nodes to start.")] = 3,
    base_port: Annotated[int | None, typer.Option(
        "--base-port", min=1, max=65000, show_default=False,
        help="Node i listens on B+10i (HTTPS), B+10i+1 (MQTT/TLS), B+10i+2 (plain MQTT); default ephemeral.",
    )] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", show_default=False,
        help=f"Shared PostgreSQL URL (default storage.database_url, else {DEFAULT_DATABASE_URL}).",
    )] = None,
    nats_url: Annotated[str | None, typer.Option(
        "--nats-url", show_default=False,
        help=f"NATS for the stream and the cluster bus (default cluster.nats_url, else {DEFAULT_NATS_URL}).",
    )] = None,
    plain_mqtt: Annotated[bool, typer.Option("--plain-mqtt", help="Also listen on plain-TCP MQTT.")] = False,
) -> None:
    """Start N local hub nodes sharing PostgreSQL and NATS JetStream; Ctrl-C stops them all."""
    state = state_of(ctx)
    with cli_errors():
        base = state.settings()
        db = database_url or base.storage.database_url or DEFAULT_DATABASE_URL
        if not db.startswith("postgresql"):
            raise BadRequest("several nodes need a shared PostgreSQL database (--database-url "
                             "postgresql+asyncpg://…); SQLite is one process's", field="database_url")
        nats = nats_url or base.cluster.nats_url or DEFAULT_NATS_URL
        configured = base.storage.stream_url or ""
        stream = configured if configured.startswith(("nats:", "tls:")) else nats
        if not base.cert_file.is_file():
            from tether.security import pki

            pki.init_pki(base.pki_dir, sorted({"localhost", base.hub.hostname.split(":")[0]}), ["127.0.0.1"])
        specs = node_specs(base, base.data_dir / "cluster", nodes, base_port=base_port, database_url=db,
                           stream_url=stream, nats_url=nats, prefix=base.cluster.subject_prefix,
                           plain_mqtt=plain_mqtt)
        for spec in specs:
            write_node_config(spec)
        first = load_settings(**{k: v for k, v in specs[0].tables.items() if k in ("hub", "storage")})
        owner = asyncio.run(prepare_storage(first))
    _run_nodes([NodeProcess(spec, connection_string=owner) for spec in specs], base)


def _run_nodes(procs: list[NodeProcess], base: Settings) -> None:
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in procs:
            proc.start()
        try:
            for proc in procs:
                proc.wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        host = base.listeners.host if base.listeners.host not in ("0.0.0.0", "::") else "127.0.0.1"
        typer.echo(f"{len(procs)} Tether nodes running (Ctrl-C stops them all):")
        for proc in procs:
            ports = "  ".join(f"{name} {host}:{port}" for name, port in sorted(proc.ports.items()))
            typer.echo(f"  {proc.spec.node_id}  pid {proc.proc.pid if proc.proc else '?'}  {ports}  "
                       f"logs {proc.err_file}")
        typer.echo(f"Service connection string: {procs[0].connection_string}")
        while not stop:
            exited = [p for p in procs if not p.running]
            if exited:
                typer.echo(f"{exited[0].spec.node_id} exited; stopping the others", err=True)
                break
            time.sleep(0.2)
    finally:
        stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        typer.echo("cluster stopped", err=True)
