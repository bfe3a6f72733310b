"""The `tether` command: global options, `init`, `run`, and the command groups.

Without `--hub-url` every command works on the local data dir through the hub's own services (local
mode); with `--hub-url` + a service connection string, registry, policy, token, import/export and
audit commands go over the running hub's REST API instead (remote mode).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from tether.cli import (
    audit,
    cluster,
    devices,
    fleet,
    modules,
    operators,
    pki,
    policies,
    tokens,
    transfer,
    trust,
)
from tether.cli.context import CONFIG_FILE_NAME, CliState, cli_errors, run, state_of
from tether.cli.local import LocalServices
from tether.cli.monitor import monitor_command
from tether.cli.policies import service_connection_string
from tether.config import Settings, load_settings
from tether.errors import BadRequest

OWNER_POLICY = "iothubowner"

app = typer.Typer(
    help="Tether: a self-hosted IoT hub speaking Azure IoT Hub's protocols.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold keys
)


@app.callback()
def global_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Settings file (TOML); sets TETHER_CONFIG.", show_default=False),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data directory (overrides hub.data_dir).", show_default=False),
    ] = None,
    hub_url: Annotated[
        str | None,
        typer.Option(
            "--hub-url",
            envvar="TETHER_HUB_URL",
            help="Work against a running hub's REST API, e.g. https://localhost:8443.",
            show_default=False,
        ),
    ] = None,
    connection_string: Annotated[
        str | None,
        typer.Option(
            "--connection-string",
            envvar="TETHER_CONNECTION_STRING",
            help="Service connection string used with --hub-url (policy with the needed rights).",
            show_default=False,
        ),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file",
            envvar="TETHER_CA_FILE",
            help="CA bundle to verify the hub's HTTPS certificate (default: {data_dir}/pki/root-ca.pem).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Global options apply to every command."""
    if config is not None:
        os.environ["TETHER_CONFIG"] = str(config)  # checked when settings are first loaded
    ctx.obj = CliState(
        config=config,
        data_dir=data_dir,
        hub_url=hub_url or None,
        connection_string=connection_string or None,
        ca_file=ca_file,
    )


def _is_initialised(settings: Settings) -> bool:
    pki_dir = settings.pki_dir
    return (
        (settings.data_dir / CONFIG_FILE_NAME).is_file()
        and (pki_dir / "root-ca.pem").is_file()
        and (pki_dir / "server.pem").is_file()
    )


def _write_config(path: Path, hostname: str) -> None:
    path.write_text(
        "# Written by `tether init`. TETHER_* environment variables override these settings.\n"
        "[hub]\n"
        f"hostname = {json.dumps(hostname)}\n",  # a TOML basic string
        encoding="utf-8",
    )


@app.command("init")
def init(
    ctx: typer.Context,
    if_needed: Annotated[
        bool, typer.Option("--if-needed", help="Do nothing (but print the string) if already initialised.")
    ] = False,
    hostname: Annotated[
        str | None,
        typer.Option("--hostname", help="Host name devices use (saved in tether.toml).", show_default=False),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", metavar="NAME_OR_IP", help="Extra name or IP for the hub's server certificate "
                     "(repeatable); the certificate is re-issued when its names change."),
    ] = None,
) -> None:
    """Create the data dir, database, default policies and dev PKI; print the owner connection string.

    Local only. The iothubowner service connection string is the only thing printed on stdout.
    """
    state = state_of(ctx)

    async def body() -> str:
        settings = state.settings()
        config_path = settings.data_dir / CONFIG_FILE_NAME
        if hostname is not None and hostname != settings.hub.hostname:
            if config_path.exists():
                raise BadRequest(
                    f"the hub is configured with host name {settings.hub.hostname!r} ({config_path}); "
                    "edit that file to change it",
                    field="hostname",
                )
            state.forget_settings()
            settings = load_settings(hub={"data_dir": settings.data_dir, "hostname": hostname})
        if not (if_needed and _is_initialised(settings)) or san:
            if not settings.data_dir.exists():
                settings.data_dir.mkdir(mode=0o700, parents=True)  # holds keys: owner only
            pki.init_dev_pki(settings, san or ())
            if not config_path.exists():
                _write_config(config_path, settings.hub.hostname)
                typer.echo(f"wrote {config_path}", err=True)
        services = LocalServices(settings)
        services.check_data_dir()
        await services.open(ensure_defaults=True)
        try:
            owner = await services.policies.get(OWNER_POLICY)
        finally:
            await services.close()
        typer.echo(f"Tether data dir ready: {settings.data_dir.resolve()}", err=True)
        return service_connection_string(settings.hub.hostname, owner)

    typer.echo(run(body))


@app.command("run")
def run_hub(ctx: typer.Context) -> None:
    """Start the hub (MQTT, HTTPS REST) on the local data dir until Ctrl-C / SIGTERM."""
    state = state_of(ctx)
    with cli_errors():
        settings = state.settings()
        LocalServices(settings).check_data_dir()
        from tether.server import run as serve_until_stopped  # uvloop when available

        serve_until_stopped(settings)


app.add_typer(devices.app, name="device")
app.add_typer(modules.app, name="module")
app.add_typer(policies.app, name="policy")
app.add_typer(tokens.app, name="token")
app.command("import")(transfer.import_command)
app.command("export")(transfer.export_command)
app.command("audit")(audit.audit_command)
app.command("monitor")(monitor_command)
app.command("cluster")(cluster.cluster_command)
app.add_typer(pki.pki_app, name="pki")
app.add_typer(pki.ca_app, name="ca")
app.add_typer(trust.tls_app, name="tls")
app.add_typer(trust.trust_app, name="trust")
app.add_typer(fleet.upload_app, name="upload")
app.add_typer(fleet.job_app, name="job")
app.add_typer(fleet.config_app, name="config")
app.add_typer(operators.user_app, name="user")
app.add_typer(operators.role_app, name="role")


def main() -> None:
    """Console-script entry point (`tether`)."""
    app()


if __name__ == "__main__":
    main()
