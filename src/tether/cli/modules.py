"""`tether module …`: module identities of a device (create, show, list, update, delete, keys,
connection strings and tokens), the companions of `tether device …`, locally or against a hub."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tether.cli.backend import Backend
from tether.cli.context import state_of, with_backend
from tether.cli.devices import (
    AuthChoice,
    DeviceId,
    Etag,
    KeyChoice,
    ShowKeys,
    auth_section,
    device_connection_string,
)
from tether.cli.output import device_json, echo_json, table
from tether.cli.tokens import Ttl, identity_token
from tether.errors import BadRequest
from tether.registry.models import Module, validate_device_id

app = typer.Typer(help="Manage module identities of devices (works locally and against a running hub).")

ModuleId = Annotated[str, typer.Argument(help="Module id (1-128 characters, Azure's rules).")]
ManagedBy = Annotated[str | None, typer.Option("--managed-by", help='Who manages it, e.g. "IotEdge".')]
Auth = Annotated[AuthChoice | None, typer.Option("--auth", help="Authentication type (default sas).")]
PrimaryKey = Annotated[str | None, typer.Option("--primary-key", help="Base64 key (default: generated).")]
SecondaryKey = Annotated[str | None, typer.Option("--secondary-key", help="Base64 key (default: generated).")]
PrimaryThumb = Annotated[str | None, typer.Option("--primary-thumbprint", help="SHA-1/256 hex (selfSigned).")]
SecondaryThumb = Annotated[str | None, typer.Option("--secondary-thumbprint", help="SHA-1/256 hex.")]


def _ids(device_id: str, module_id: str) -> None:
    validate_device_id(device_id)
    validate_device_id(module_id, "moduleId")


@app.command("create")
def create(
    ctx: typer.Context,
    device_id: DeviceId,
    module_id: ModuleId,
    auth: Auth = None,
    primary_key: PrimaryKey = None,
    secondary_key: SecondaryKey = None,
    primary_thumbprint: PrimaryThumb = None,
    secondary_thumbprint: SecondaryThumb = None,
    managed_by: ManagedBy = None,
    show_keys: ShowKeys = False,
) -> None:
    """Register a module of a device; prints its JSON (keys hidden unless --show-keys)."""

    async def body(backend: Backend) -> Module:
        _ids(device_id, module_id)
        doc: dict[str, Any] = {"moduleId": module_id, "deviceId": device_id, "managedBy": managed_by}
        section = auth_section(auth, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint)
        doc["authentication"] = section or {"type": "sas"}
        return await backend.create_module(device_id, module_id, doc)

    echo_json(device_json(with_backend(state_of(ctx), body), show_keys=show_keys))


@app.command("show")
def show(ctx: typer.Context, device_id: DeviceId, module_id: ModuleId, show_keys: ShowKeys = False) -> None:
    """Print one module as Azure JSON; symmetric keys are hidden unless --show-keys."""

    async def body(backend: Backend) -> Module:
        return await backend.get_module(device_id, module_id)

    echo_json(device_json(with_backend(state_of(ctx), body), show_keys=show_keys))


@app.command("list")
def list_(
    ctx: typer.Context,
    device_id: DeviceId,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document per line (no keys).")] = False,
) -> None:
    """List the modules of a device (id, auth type, managed by, connection state, last activity)."""

    async def body(backend: Backend) -> list[Module]:
        return await backend.list_modules(device_id)

    modules = with_backend(state_of(ctx), body)
    if as_json:
        for module in modules:
            echo_json(device_json(module), compact=True)
        return
    table(
        ["MODULE ID", "AUTH", "MANAGED BY", "CONNECTION", "LAST ACTIVITY"],
        [
            (
                m.module_id,
                m.authentication.type.value,
                m.managed_by or "-",
                m.connection_state.value,
                m.last_activity_time.isoformat() if m.last_activity_time.year > 1 else "-",
            )
            for m in modules
        ],
    )


@app.command("update")
def update(
    ctx: typer.Context,
    device_id: DeviceId,
    module_id: ModuleId,
    auth: Auth = None,
    primary_key: PrimaryKey = None,
    secondary_key: SecondaryKey = None,
    primary_thumbprint: PrimaryThumb = None,
    secondary_thumbprint: SecondaryThumb = None,
    managed_by: ManagedBy = None,
    etag: Etag = None,
    show_keys: ShowKeys = False,
) -> None:
    """Change a module's authentication or managedBy (keys not given are kept)."""

    async def body(backend: Backend) -> Module:
        section = auth_section(auth, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint)
        if section is None and managed_by is None:
            raise BadRequest("nothing to update: give auth options or --managed-by")
        current = await backend.get_module(device_id, module_id)
        doc = current.to_wire()
        if managed_by is not None:
            doc["managedBy"] = managed_by or None
        if section is not None:
            doc["authentication"] = section
        return await backend.replace_module(device_id, module_id, doc, etag)

    echo_json(device_json(with_backend(state_of(ctx), body), show_keys=show_keys))


@app.command("delete")
def delete(ctx: typer.Context, device_id: DeviceId, module_id: ModuleId, etag: Etag = None) -> None:
    """Delete a module and its twin (its connection is closed at once)."""

    async def body(backend: Backend) -> None:
        await backend.delete_module(device_id, module_id, etag)

    with_backend(state_of(ctx), body)
    typer.echo(f"deleted module {module_id} of device {device_id}")


@app.command("regenerate-key")
def regenerate_key(
    ctx: typer.Context,
    device_id: DeviceId,
    module_id: ModuleId,
    key: Annotated[KeyChoice, typer.Option("--key", help="Which key to replace.")],
    show_keys: ShowKeys = False,
) -> None:
    """Replace a module's primary, secondary or both symmetric keys."""

    async def body(backend: Backend) -> Module:
        return await backend.regenerate_module_key(device_id, module_id, key.value)

    module = with_backend(state_of(ctx), body)
    if show_keys:
        echo_json(device_json(module, show_keys=True))
    else:
        typer.echo(f"regenerated {key.value} key of module {module_id} of device {device_id} "
                   "(use --show-keys to print)")


@app.command("connection-string")
def connection_string(
    ctx: typer.Context,
    device_id: DeviceId,
    module_id: ModuleId,
    x509: Annotated[bool, typer.Option("--x509", help="X.509 form (x509=true, no key).")] = False,
) -> None:
    """Print the module connection string (`…;ModuleId=…;SharedAccessKey=` the module's own key)."""

    async def body(backend: Backend) -> str:
        return device_connection_string(backend.hostname, await backend.get_module(device_id, module_id),
                                        x509=x509)

    typer.echo(with_backend(state_of(ctx), body))


@app.command("token")
def token(
    ctx: typer.Context,
    device_id: DeviceId,
    module_id: ModuleId,
    ttl: Ttl = 3600,
    policy: Annotated[
        str | None,
        typer.Option("--policy", help="Sign with this DeviceConnect policy's key (adds skn) instead."),
    ] = None,
) -> None:
    """Print a module SAS token (sr={host}/devices/{id}/modules/{mid}) signed with the module's key."""

    async def body(backend: Backend) -> str:
        return await identity_token(backend, device_id, module_id, ttl=ttl, policy=policy)

    typer.echo(with_backend(state_of(ctx), body))
