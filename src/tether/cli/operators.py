"""`tether user …` and `tether role …`: local operators and role assignments (local mode only: they
open the data dir's database, also beside a running hub, which sees the changes within seconds).

Passwords are read from a hidden prompt (or `--password-stdin` for scripts), never from arguments,
so they stay out of shell history and process listings.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, TypeVar

import typer

from tether.cli.context import LOCAL_ACTOR, run, state_of
from tether.cli.output import echo_json, table
from tether.security.audit import AuditLog
from tether.security.operators import LOCAL_ISSUER, OperatorService
from tether.security.role_assignments import RoleService
from tether.security.sessions import SessionService
from tether.storage.sql.operators import SqlOperatorRepository

user_app = typer.Typer(help="Local operators: people who sign in to the console with a password.")
role_app = typer.Typer(help="Role assignments: Owner, DataContributor, DataReader, RegistryContributor, "
                            "TwinContributor, optionally scoped to devices by a query condition.")
T = TypeVar("T")

Username = Annotated[str, typer.Argument(help="Operator name (1-64 letters, digits, _ . @ -).")]
PasswordStdin = Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")]


@dataclass
class _Services:
    operators: OperatorService
    roles: RoleService


def _local(ctx: typer.Context, fn: Callable[[_Services], Awaitable[T]]) -> T:
    state = state_of(ctx)

    @asynccontextmanager
    async def opened() -> AsyncIterator[_Services]:
        settings = state.require_local("operators and role assignments")
        from tether.cli.local import LocalServices
        from tether.messaging.query.scope import validate_scope

        services = LocalServices(settings)
        services.check_data_dir()
        await services.open(ensure_defaults=False)
        try:
            repo = SqlOperatorRepository(services.storage.db)
            audit: AuditLog = services.audit
            sessions = SessionService(repo, ttl_s=settings.operators.session_ttl_s)
            yield _Services(
                OperatorService(repo, audit, lockout_threshold=settings.operators.lockout_threshold,
                                lockout_s=settings.operators.lockout_s,
                                on_revoke=lambda name: sessions.end_all(LOCAL_ISSUER, name)),
                RoleService(repo, audit, validate_scope=validate_scope))
        finally:
            await services.close()

    async def body() -> T:
        async with opened() as services:
            return await fn(services)

    return run(body)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@user_app.command("add")
def add(ctx: typer.Context, username: Username, password_stdin: PasswordStdin = False,
        totp: Annotated[bool, typer.Option("--totp", help="Require a TOTP code at sign-in (prints the "
                                            "authenticator-app URI once).")] = False) -> None:
    """Create a local operator. Give them a role with `tether role assign --user NAME --role …`."""
    password = _password(password_stdin)

    async def body(s: _Services) -> str | None:
        _, secret = await s.operators.add(username, password, with_totp=totp, actor=LOCAL_ACTOR)
        return secret

    secret = _local(ctx, body)
    typer.echo(f"created operator {username}", err=True)
    if secret is not None:
        from tether.security.totp import provisioning_uri

        typer.echo(provisioning_uri(secret, username))


@user_app.command("passwd")
def passwd(ctx: typer.Context, username: Username, password_stdin: PasswordStdin = False) -> None:
    """Set a new password (clears a lockout, ends the operator's sessions)."""
    password = _password(password_stdin)
    _local(ctx, lambda s: s.operators.set_password(username, password, actor=LOCAL_ACTOR))
    typer.echo(f"password of {username} changed", err=True)


@user_app.command("disable")
def disable(ctx: typer.Context, username: Username) -> None:
    """Disable an operator: sign-in refused, every session ended at once."""
    _local(ctx, lambda s: s.operators.set_disabled(username, True, actor=LOCAL_ACTOR))
    typer.echo(f"disabled {username}", err=True)


@user_app.command("enable")
def enable(ctx: typer.Context, username: Username) -> None:
    """Enable a disabled operator again."""
    _local(ctx, lambda s: s.operators.set_disabled(username, False, actor=LOCAL_ACTOR))
    typer.echo(f"enabled {username}", err=True)


@user_app.command("totp")
def totp_command(
    ctx: typer.Context, username: Username,
    enable: Annotated[bool, typer.Option("--enable/--disable", help="Turn TOTP on or off.")] = True,
) -> None:
    """Enrol a new TOTP secret (printed once as an otpauth:// URI) or remove the second factor."""
    secret = _local(ctx, lambda s: s.operators.set_totp(username, enable, actor=LOCAL_ACTOR))
    if secret is not None:
        from tether.security.totp import provisioning_uri

        typer.echo(provisioning_uri(secret, username))
    else:
        typer.echo(f"TOTP removed for {username}", err=True)


@user_app.command("list")
def list_users(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Operators, whether they use TOTP, and their state (never a hash or secret)."""
    records = _local(ctx, lambda s: s.operators.list())
    rows = [{"username": r.username, "totp": r.totp_secret is not None, "disabled": r.disabled,
             "lockedUntil": r.locked_until.isoformat() if r.locked_until else None} for r in records]
    if as_json:
        echo_json(rows)
        return
    table(["USERNAME", "TOTP", "DISABLED", "LOCKED UNTIL"],
          [[r["username"], str(r["totp"]).lower(), str(r["disabled"]).lower(), r["lockedUntil"] or ""]
           for r in rows])


@role_app.command("assign")
def assign(
    ctx: typer.Context,
    role: Annotated[str, typer.Option("--role", help="Owner, DataContributor, DataReader, "
                                      "RegistryContributor or TwinContributor.")],
    user: Annotated[str | None, typer.Option("--user", help="A local operator.")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="An OIDC subject (with --issuer).")] = None,
    issuer: Annotated[str | None, typer.Option("--issuer", help="The OIDC provider's issuer URL.")] = None,
    scope: Annotated[str | None, typer.Option("--scope", help="Query condition limiting the role to "
                                              "matching devices, e.g. \"tags.site = 'plant-1'\".")] = None,
) -> None:
    """Give an operator a role (idempotent)."""
    if (user is None) == (subject is None) or (subject is not None and issuer is None):
        raise typer.BadParameter("give --user NAME, or --subject SUB with --issuer URL")
    who_issuer, who = (LOCAL_ISSUER, user) if user is not None else (issuer or "", subject or "")
    record = _local(ctx, lambda s: s.roles.assign(who_issuer, who, role, scope, actor=LOCAL_ACTOR))
    echo_json({"id": record.id, "issuer": record.issuer, "subject": record.subject, "role": record.role,
               "scope": record.scope})


@role_app.command("list")
def list_roles(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every local role assignment."""
    records = _local(ctx, lambda s: s.roles.list())
    rows = [{"id": r.id, "issuer": r.issuer, "subject": r.subject, "role": r.role, "scope": r.scope}
            for r in records]
    if as_json:
        echo_json(rows)
        return
    table(["ID", "ISSUER", "SUBJECT", "ROLE", "SCOPE"],
          [[str(r["id"]), str(r["issuer"]), str(r["subject"]), str(r["role"]), str(r["scope"] or "")]
           for r in rows])


@role_app.command("remove")
def remove(ctx: typer.Context, assignment_id: Annotated[int, typer.Argument(help="From `tether role list`.")]
           ) -> None:
    """Remove a role assignment."""
    _local(ctx, lambda s: s.roles.remove(assignment_id, actor=LOCAL_ACTOR))
    typer.echo(f"removed role assignment {assignment_id}", err=True)
