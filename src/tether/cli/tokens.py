"""`tether token …`: mint SAS tokens for devices and policies (printed alone, for scripts)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from tether.cli.backend import KEYS_WITHHELD, Backend
from tether.cli.context import state_of, with_backend
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
        "--module", help="A token for this module of the device (signed with the module's key).")] = None,
) -> None:
    """Print a device (or module) SAS token signed with its primary key (or a policy key with --policy)."""

    async def body(backend: Backend) -> str:
        return await identity_token(backend, device_id, module, ttl=ttl, policy=policy)

    typer.echo(with_backend(state_of(ctx), body))


async def identity_token(backend: Backend, device_id: str, module_id: str | None, *, ttl: int,
                         policy: str | None) -> str:
    """A device or module SAS token: signed with the identity's own primary key, or with a
    DeviceConnect policy's key (`skn`). A module's token is scoped to the module, so it is never a
    device's token (nor a device's a module's)."""
    validate_device_id(device_id)
    resource = f"{backend.hostname}/devices/{device_id}"
    if module_id is not None:
        resource += f"/modules/{validate_device_id(module_id, 'moduleId')}"
    expiry = int(time.time()) + ttl
    if policy is not None:
        record = await backend.get_policy(policy)
        if Permission.device_connect.value not in record.permissions:
            raise BadRequest(f"policy {policy} lacks DeviceConnect; it cannot sign device tokens")
        return build_token(resource, record.primary_key, expiry, policy_name=record.name)
    identity = (await backend.get_device(device_id) if module_id is None
                else await backend.get_module(device_id, module_id))
    key = identity.authentication.symmetric_key.primary_key
    if not key:
        what = f"device {device_id}" if module_id is None else f"module {device_id}/{module_id}"
        raise BadRequest(f"{what} has no symmetric key (auth {identity.authentication.type.value}; "
                         f"{KEYS_WITHHELD}); use --policy with a DeviceConnect policy")
    return build_token(resource, key, expiry)


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
