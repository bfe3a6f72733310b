"""`tether device …`: the device identity registry (create, show, list, update, delete, keys)."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from tether.cli.backend import KEYS_WITHHELD, Backend
from tether.cli.context import state_of, with_backend
from tether.cli.output import device_json, echo_json, table
from tether.errors import BadRequest
from tether.registry.models import AuthType, Device, Module, validate_device_id

app = typer.Typer(help="Manage device identities (works locally and against a running hub).")


class AuthChoice(StrEnum):
    sas = "sas"
    self_signed = "selfSigned"
    certificate_authority = "certificateAuthority"
    none = "none"


class StatusChoice(StrEnum):
    enabled = "enabled"
    disabled = "disabled"


class KeyChoice(StrEnum):
    primary = "primary"
    secondary = "secondary"
    both = "both"


DeviceId = Annotated[str, typer.Argument(help="Device id (1-128 characters, Azure's rules).")]
ShowKeys = Annotated[bool, typer.Option("--show-keys", help="Print the symmetric keys (secrets).")]
Etag = Annotated[
    str | None, typer.Option("--etag", help="Only act if the device still has this etag (default: any).")
]


def auth_section(
    auth: AuthChoice | None,
    primary_key: str | None,
    secondary_key: str | None,
    primary_thumbprint: str | None,
    secondary_thumbprint: str | None,
) -> dict[str, Any] | None:
    """The `authentication` JSON for the given options; None when no option was given."""
    given = (auth, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint)
    if all(v is None for v in given):
        return None
    kind = auth.value if auth else ("selfSigned" if primary_thumbprint or secondary_thumbprint else "sas")
    if kind == AuthType.self_signed and not primary_thumbprint:
        raise BadRequest("--auth selfSigned needs --primary-thumbprint", field="primary_thumbprint")
    if kind != AuthType.sas and (primary_key or secondary_key):
        raise BadRequest(f"--primary-key/--secondary-key need --auth sas, not {kind}", field="auth")
    if kind != AuthType.self_signed and (primary_thumbprint or secondary_thumbprint):
        raise BadRequest(f"thumbprints need --auth selfSigned, not {kind}", field="auth")
    section: dict[str, Any] = {"type": kind}
    if primary_key or secondary_key:
        section["symmetricKey"] = {"primaryKey": primary_key, "secondaryKey": secondary_key}
    if primary_thumbprint or secondary_thumbprint:
        section["x509Thumbprint"] = {
            "primaryThumbprint": primary_thumbprint,
            "secondaryThumbprint": secondary_thumbprint,
        }
    return section


@app.command("create")
def create(
    ctx: typer.Context,
    device_id: DeviceId,
    auth: Annotated[
        AuthChoice | None, typer.Option("--auth", help="Authentication type (default sas).")
    ] = None,
    primary_key: Annotated[
        str | None, typer.Option("--primary-key", help="Base64 primary key (default: generated).")
    ] = None,
    secondary_key: Annotated[
        str | None, typer.Option("--secondary-key", help="Base64 secondary key (default: generated).")
    ] = None,
    primary_thumbprint: Annotated[
        str | None, typer.Option("--primary-thumbprint", help="SHA-1 or SHA-256 hex (selfSigned).")
    ] = None,
    secondary_thumbprint: Annotated[
        str | None, typer.Option("--secondary-thumbprint", help="SHA-1 or SHA-256 hex (selfSigned).")
    ] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Create the device disabled.")] = False,
    show_keys: ShowKeys = False,
) -> None:
    """Register a device; prints its JSON (keys hidden unless --show-keys)."""
    state = state_of(ctx)

    async def body(backend: Backend) -> Device:
        validate_device_id(device_id)
        doc: dict[str, Any] = {"deviceId": device_id, "status": "disabled" if disabled else "enabled"}
        section = auth_section(auth, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint)
        doc["authentication"] = section or {"type": "sas"}
        return await backend.create_device(device_id, doc)

    echo_json(device_json(with_backend(state, body), show_keys=show_keys))


@app.command("show")
def show(ctx: typer.Context, device_id: DeviceId, show_keys: ShowKeys = False) -> None:
    """Print one device as Azure JSON; symmetric keys are hidden unless --show-keys."""

    async def body(backend: Backend) -> Device:
        return await backend.get_device(device_id)

    echo_json(device_json(with_backend(state_of(ctx), body), show_keys=show_keys))


@app.command("list")
def list_(
    ctx: typer.Context,
    top: Annotated[int, typer.Option("--top", min=1, max=100_000, help="At most this many devices.")] = 1000,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document per line (keys hidden).")
    ] = False,
) -> None:
    """List devices (id, status, auth type, connection state, last activity)."""

    async def body(backend: Backend) -> list[Device]:
        return await backend.list_devices(top)

    devices = with_backend(state_of(ctx), body)
    if as_json:
        for device in devices:
            echo_json(device_json(device), compact=True)
        return
    table(
        ["DEVICE ID", "STATUS", "AUTH", "CONNECTION", "LAST ACTIVITY"],
        [
            (
                d.device_id,
                d.status.value,
                d.authentication.type.value,
                d.connection_state.value,
                d.last_activity_time.isoformat() if d.last_activity_time.year > 1 else "-",
            )
            for d in devices
        ],
    )


def _read_json_file(path: Path) -> dict[str, Any]:
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{path}: expected a JSON object (a device)")
    return doc


@app.command("update")
def update(
    ctx: typer.Context,
    device_id: DeviceId,
    status: Annotated[StatusChoice | None, typer.Option("--status", help="enabled or disabled.")] = None,
    status_reason: Annotated[
        str | None, typer.Option("--status-reason", help="Why the status changed (≤ 128 chars).")
    ] = None,
    auth: Annotated[AuthChoice | None, typer.Option("--auth", help="New authentication type.")] = None,
    primary_key: Annotated[str | None, typer.Option("--primary-key", help="New base64 key.")] = None,
    secondary_key: Annotated[str | None, typer.Option("--secondary-key", help="New base64 key.")] = None,
    primary_thumbprint: Annotated[
        str | None, typer.Option("--primary-thumbprint", help="New thumbprint (selfSigned).")
    ] = None,
    secondary_thumbprint: Annotated[
        str | None, typer.Option("--secondary-thumbprint", help="New thumbprint (selfSigned).")
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="Replace with this device JSON ('-' for stdin).", show_default=False),
    ] = None,
    etag: Etag = None,
    show_keys: ShowKeys = False,
) -> None:
    """Change a device: status/auth options, or a whole device document with --json FILE."""

    async def body(backend: Backend) -> Device:
        if json_file is not None:
            doc = _read_json_file(json_file)
            doc.setdefault("deviceId", device_id)
            if doc["deviceId"] != device_id:
                raise BadRequest(f"--json has deviceId {doc['deviceId']!r}, not {device_id!r}")
        else:
            section = auth_section(
                auth, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint
            )
            if status is None and status_reason is None and section is None:
                raise BadRequest("nothing to update: give --status, --status-reason, auth options or --json")
            current = await backend.get_device(device_id)
            doc = current.to_wire()
            if status is not None:
                doc["status"] = status.value
            if status_reason is not None:
                doc["statusReason"] = status_reason
            if section is not None:
                doc["authentication"] = section
        return await backend.replace_device(device_id, doc, etag)

    echo_json(device_json(with_backend(state_of(ctx), body), show_keys=show_keys))


@app.command("delete")
def delete(ctx: typer.Context, device_id: DeviceId, etag: Etag = None) -> None:
    """Delete a device (its connections are dropped at once)."""

    async def body(backend: Backend) -> None:
        await backend.delete_device(device_id, etag)

    with_backend(state_of(ctx), body)
    typer.echo(f"deleted device {device_id}")


@app.command("enable")
def enable(ctx: typer.Context, device_id: DeviceId) -> None:
    """Enable a device so it can connect again."""

    async def body(backend: Backend) -> Device:
        return await backend.set_status(device_id, True, None)

    device = with_backend(state_of(ctx), body)
    typer.echo(f"device {device.device_id} is {device.status.value}")


@app.command("disable")
def disable(
    ctx: typer.Context,
    device_id: DeviceId,
    reason: Annotated[str | None, typer.Option("--reason", help="Status reason (≤ 128 chars).")] = None,
) -> None:
    """Disable a device: it is refused and its open connections are closed."""

    async def body(backend: Backend) -> Device:
        return await backend.set_status(device_id, False, reason)

    device = with_backend(state_of(ctx), body)
    typer.echo(f"device {device.device_id} is {device.status.value}")


@app.command("regenerate-key")
def regenerate_key(
    ctx: typer.Context,
    device_id: DeviceId,
    key: Annotated[KeyChoice, typer.Option("--key", help="Which key to replace.")],
    show_keys: ShowKeys = False,
) -> None:
    """Replace a device's primary, secondary or both symmetric keys (new keys shown with --show-keys)."""

    async def body(backend: Backend) -> Device:
        return await backend.regenerate_device_key(device_id, key.value)

    device = with_backend(state_of(ctx), body)
    if show_keys:
        echo_json(device_json(device, show_keys=True))
    else:
        typer.echo(f"regenerated {key.value} key of device {device.device_id} (use --show-keys to print)")


def device_connection_string(
    hostname: str, device: Device | Module, *, x509: bool = False
) -> str:
    """Azure's device (or module: `ModuleId=`) connection string; X.509 identities get `x509=true`
    instead of a key."""
    parts = [f"HostName={hostname}", f"DeviceId={device.device_id}"]
    if isinstance(device, Module):
        parts.append(f"ModuleId={device.module_id}")
    auth = device.authentication
    if x509 or auth.type in (AuthType.self_signed, AuthType.certificate_authority):
        parts.append("x509=true")
    else:
        key = auth.symmetric_key.primary_key
        if not key:
            what = "module" if isinstance(device, Module) else "device"
            raise BadRequest(f"{what} {device.device_id} has no symmetric key (auth {auth.type.value}; "
                             f"{KEYS_WITHHELD})")
        parts.append(f"SharedAccessKey={key}")
    return ";".join(parts)


@app.command("connection-string")
def connection_string(
    ctx: typer.Context,
    device_id: DeviceId,
    module: Annotated[str | None, typer.Option(
        "--module", help="The connection string of this module of the device (its own key).")] = None,
    x509: Annotated[bool, typer.Option("--x509", help="X.509 form (x509=true, no key).")] = False,
) -> None:
    """Print the device (or module) connection string (contains the primary key unless --x509)."""

    async def body(backend: Backend) -> str:
        identity: Device | Module = (await backend.get_device(device_id) if module is None
                                     else await backend.get_module(device_id, module))
        return device_connection_string(backend.hostname, identity, x509=x509)

    typer.echo(with_backend(state_of(ctx), body))
