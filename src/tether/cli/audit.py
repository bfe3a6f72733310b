"""`tether audit`: who did what — authentication decisions and registry/policy changes."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer

from tether.cli.backend import Backend
from tether.cli.context import state_of, with_backend
from tether.cli.output import echo_json, table
from tether.errors import BadRequest
from tether.storage.base import AuditRecord


class Outcome(StrEnum):
    allowed = "allowed"
    refused = "refused"
    ok = "ok"
    failed = "failed"


def parse_since(text: str | None) -> datetime | None:
    """ISO 8601; a value without a zone is UTC."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"--since must be an ISO 8601 date-time, got {text!r}", field="since") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def record_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "time": record.time.isoformat(),
        "action": record.action,
        "outcome": record.outcome,
        "principal": record.principal,
        "credential": record.credential,
        "reason": record.reason,
        "peer": record.peer,
        "target": record.target,
        "details": record.details,
    }


def audit_command(
    ctx: typer.Context,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=1000, help="At most this many records (1-1000).")
    ] = 100,
    since: Annotated[
        str | None, typer.Option("--since", help="Only records at or after this ISO 8601 time.")
    ] = None,
    outcome: Annotated[Outcome | None, typer.Option("--outcome", help="Only this outcome.")] = None,
    action: Annotated[
        str | None, typer.Option("--action", help="Only actions starting with this, e.g. auth. or device.")
    ] = None,
    principal: Annotated[
        str | None, typer.Option("--principal", help="Only this principal, e.g. policy:iothubowner.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show the audit log, newest first (works locally and against a running hub)."""

    async def body(backend: Backend) -> list[AuditRecord]:
        return await backend.audit(
            limit=limit,
            since=parse_since(since),
            outcome=outcome.value if outcome else None,
            action_prefix=action,
            principal=principal,
        )

    records = with_backend(state_of(ctx), body)
    if as_json:
        for record in records:
            echo_json(record_json(record), compact=True)
        return
    table(
        ["TIME", "ACTION", "OUTCOME", "PRINCIPAL", "TARGET", "REASON", "PEER"],
        [
            (
                r.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                r.action,
                r.outcome,
                r.principal or "-",
                r.target or "-",
                r.reason or "-",
                r.peer or "-",
            )
            for r in records
        ],
    )
