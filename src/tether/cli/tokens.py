"""`tether token …`: mint SAS tokens for devices and policies (printed alone, for scripts)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from tether.cli.backend import Backend
from tether.cli.context import state_of, with_backend
from tether.cli.devices import check_module_credential
from tether.errors import BadRequest
from tether.registry.models import validate_device_id
from tether.security.principal import Permission
from tether.security.sas import DEFAULT_MAX_LIFETIME_S, build_token

app = typer.Typer(help="Create SAS tokens (works locally and against a running hub).")

Ttl = Annotated[
    int,
    typer.Option("--ttl", min=1, max=DEFAULT_MAX_LIFETIME_S, help="Lifetime in seconds (max 365 days)."),
]


@app.command("device")
def device_token(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device the token is for.")],
    ttl: Ttl = 3600,
    policy: Annotated[
        str | None,
        typer.Option("--policy", help="Sign with this DeviceConnect policy's key (adds skn) instead."),
    ] = None,
    module: Annotated[str | None, typer.Option(
        "--module", help="Scope the token to this module (refused until module identities exist).")] = None,
) -> None:
    """Print a device SAS token signed with the device's primary key (or a policy key with --policy)."""

    async def body(backend: Backend) -> str:
        validate_device_id(device_id)
        resource = f"{backend.hostname}/devices/{device_id}"
        if module is not None:
            await backend.get_device(device_id)  # an unknown device is the first thing to say
            await check_module_credential(backend, device_id, module)
            resource += f"/modules/{validate_device_id(module, 'moduleId')}"
        expiry = int(time.time()) + ttl
        if policy is not None:
            record = await backend.get_policy(policy)
            if Permission.device_connect.value not in record.permissions:
                raise BadRequest(f"policy {policy} lacks DeviceConnect; it cannot sign device tokens")
            return build_token(resource, record.primary_key, expiry, policy_name=record.name)
        device = await backend.get_device(device_id)
        key = device.authentication.symmetric_key.primary_key
        if not key:
            raise BadRequest(
                f"device {device_id} has no symmetric key (auth {device.authentication.type.value}); "
                "use --policy with a DeviceConnect policy"
            )
        return build_token(resource, key, expiry)

    typer.echo(with_backend(state_of(ctx), body))


@app.command("policy")
def policy_token(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Shared access policy that signs the token.")],
    ttl: Ttl = 3600,
) -> None:
    """Print a hub-level service token (sr={hostname}, skn=NAME) signed with the policy's primary key."""

    async def body(backend: Backend) -> str:
        record = await backend.get_policy(name)
        return build_token(backend.hostname, record.primary_key, int(time.time()) + ttl, policy_name=name)

    typer.echo(with_backend(state_of(ctx), body))
