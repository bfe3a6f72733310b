"""Printing helpers: JSON documents, plain tables, and the one place that hides secrets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import typer

from tether.registry.models import Device, Module
from tether.storage.base import PolicyRecord

HIDDEN = "<hidden>"


def echo_json(value: Any, *, compact: bool = False) -> None:
    if compact:
        typer.echo(json.dumps(value, separators=(",", ":"), sort_keys=False, default=str))
    else:
        typer.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


def device_json(device: Device | Module, *, show_keys: bool = False) -> dict[str, Any]:
    """Azure wire JSON of a device or module; symmetric keys replaced by a marker unless asked for."""
    wire = device.to_wire()
    if not show_keys:
        sym = wire.get("authentication", {}).get("symmetricKey", {})
        for name in ("primaryKey", "secondaryKey"):
            if sym.get(name):
                sym[name] = HIDDEN
    return wire


def policy_json(policy: PolicyRecord, *, show_keys: bool = False) -> dict[str, Any]:
    return {
        "keyName": policy.name,
        "rights": ", ".join(sorted(policy.permissions)),
        "primaryKey": policy.primary_key if show_keys else HIDDEN,
        "secondaryKey": policy.secondary_key if show_keys else HIDDEN,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A left-aligned text table; the last column is not padded."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row))
        typer.echo(line.rstrip())
        if n == 0:
            typer.echo("  ".join("-" * w for w in widths))
