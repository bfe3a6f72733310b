"""`tether policy …`: shared access policies (the service-side credentials and their rights)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from tether.cli.backend import Backend
from tether.cli.context import state_of, with_backend
from tether.cli.output import echo_json, policy_json, table
from tether.errors import BadRequest
from tether.security.principal import Permission
from tether.storage.base import PolicyRecord

app = typer.Typer(help="Manage shared access policies (works locally and against a running hub).")

PolicyName = Annotated[str, typer.Argument(help="Policy name, e.g. iothubowner.")]


class KeyChoice(StrEnum):
    primary = "primary"
    secondary = "secondary"
    both = "both"


def parse_rights(text: str) -> list[str]:
    """`RegistryRead,ServiceConnect` → validated permission names (case-insensitive input)."""
    by_lower = {p.value.lower(): p.value for p in Permission}
    rights: list[str] = []
    for item in (part.strip() for part in text.replace(" ", ",").split(",")):
        if not item:
            continue
        value = by_lower.get(item.lower())
        if value is None:
            raise BadRequest(
                f"unknown right {item!r}; choose from {', '.join(p.value for p in Permission)}",
                field="rights",
            )
        if value not in rights:
            rights.append(value)
    if not rights:
        raise BadRequest("--rights needs at least one right", field="rights")
    return rights


def service_connection_string(hostname: str, policy: PolicyRecord) -> str:
    return f"HostName={hostname};SharedAccessKeyName={policy.name};SharedAccessKey={policy.primary_key}"


@app.command("list")
def list_(
    ctx: typer.Context,
    show_keys: Annotated[bool, typer.Option("--show-keys", help="Print the policy keys (secrets).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """List policies and their rights; keys are hidden unless --show-keys."""

    async def body(backend: Backend) -> list[PolicyRecord]:
        return await backend.list_policies(keys=show_keys)

    policies = sorted(with_backend(state_of(ctx), body), key=lambda p: p.name)
    if as_json:
        echo_json([policy_json(p, show_keys=show_keys) for p in policies])
        return
    headers = ["NAME", "RIGHTS"] + (["PRIMARY KEY", "SECONDARY KEY"] if show_keys else [])
    rows = []
    for p in policies:
        row = [p.name, ",".join(sorted(p.permissions))]
        if show_keys:
            row += [p.primary_key, p.secondary_key]
        rows.append(row)
    table(headers, rows)


@app.command("create")
def create(
    ctx: typer.Context,
    name: PolicyName,
    rights: Annotated[
        str,
        typer.Option(
            "--rights",
            help="Comma-separated: RegistryRead, RegistryReadWrite, ServiceConnect, DeviceConnect.",
        ),
    ],
    show_keys: Annotated[bool, typer.Option("--show-keys", help="Print the new keys.")] = False,
) -> None:
    """Create a policy with generated keys."""

    async def body(backend: Backend) -> PolicyRecord:
        return await backend.create_policy(name, parse_rights(rights))

    echo_json(policy_json(with_backend(state_of(ctx), body), show_keys=show_keys))


@app.command("delete")
def delete(ctx: typer.Context, name: PolicyName) -> None:
    """Delete a policy; tokens signed with its keys stop working at once."""

    async def body(backend: Backend) -> None:
        await backend.delete_policy(name)

    with_backend(state_of(ctx), body)
    typer.echo(f"deleted policy {name}")


@app.command("regenerate-key")
def regenerate_key(
    ctx: typer.Context,
    name: PolicyName,
    key: Annotated[KeyChoice, typer.Option("--key", help="Which key to replace.")],
    show_keys: Annotated[bool, typer.Option("--show-keys", help="Print the new keys.")] = False,
) -> None:
    """Replace a policy's primary, secondary or both keys (printed only with --show-keys)."""

    async def body(backend: Backend) -> PolicyRecord:
        return await backend.regenerate_policy_key(name, key.value)

    policy = with_backend(state_of(ctx), body)
    if show_keys:
        echo_json(policy_json(policy, show_keys=True))
    else:
        typer.echo(f"regenerated {key.value} key of policy {policy.name} (use --show-keys to print)")


@app.command("connection-string")
def connection_string(ctx: typer.Context, name: PolicyName) -> None:
    """Print the service connection string of a policy (contains its primary key)."""

    async def body(backend: Backend) -> str:
        policy = await backend.get_policy(name)
        if not policy.primary_key:
            raise BadRequest(f"the hub did not return the keys of policy {name}")
        return service_connection_string(backend.hostname, policy)

    typer.echo(with_backend(state_of(ctx), body))
