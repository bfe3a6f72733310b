"""`tether import` / `tether export`: move whole registries as JSON lines (keys included)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tether.cli.backend import Backend
from tether.cli.context import state_of, with_backend
from tether.errors import BadRequest


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    """One device object per line; blank lines skipped; errors name the line."""
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{path} line {number}: malformed JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise BadRequest(f"{path} line {number}: expected a JSON object (a device)")
        records.append(value)
    if not records:
        raise BadRequest(f"{path} has no devices (one JSON object per line)")
    return records


def import_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON lines file, one device per line ('-' for stdin).")],
) -> None:
    """Create every device in FILE, all or nothing; prints how many were imported."""

    async def body(backend: Backend) -> int:
        return await backend.import_devices(read_ndjson(file))

    count = with_backend(state_of(ctx), body)
    typer.echo(f"imported {count} devices")


def export_command(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(help="Write here (mode 0600) instead of stdout.", show_default=False),
    ] = None,
) -> None:
    """Write every device as JSON lines. The output contains the devices' keys: keep it secret."""

    async def body(backend: Backend) -> int:
        count = 0
        if file is None:
            async for device in backend.export_devices():
                typer.echo(json.dumps(device.to_wire(), separators=(",", ":")))
                count += 1
            return count
        tmp = file.with_name(f".{file.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                async for device in backend.export_devices():
                    out.write(json.dumps(device.to_wire(), separators=(",", ":")) + "\n")
                    count += 1
            os.replace(tmp, file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return count

    count = with_backend(state_of(ctx), body)
    if file is not None:
        typer.echo(f"exported {count} devices to {file}")
