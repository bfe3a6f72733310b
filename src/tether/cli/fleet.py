"""`tether upload …`, `tether job …`, `tether config …`: file upload notifications and settings, jobs
(scheduled twin updates and methods, import/export) and automatic device configurations. Remote mode
only (`--hub-url` + `--connection-string`): jobs and configurations are run by a running hub. Every
command prints the hub's JSON."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer

from tether.cli.context import CliState, run, state_of
from tether.cli.output import echo_json
from tether.cli.remote import API_VERSION, TIMEOUT_S, error_from_response
from tether.cli.trust import _verify
from tether.errors import BadRequest
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token

__all__ = ["config_app", "job_app", "upload_app"]

upload_app = typer.Typer(
    help="File uploads: settings and the notification queue (remote mode).", no_args_is_help=True
)
job_app = typer.Typer(
    help="Jobs: scheduled twin updates and direct methods, import/export (remote mode).", no_args_is_help=True
)
config_app = typer.Typer(help="Automatic device configurations (remote mode).", no_args_is_help=True)
TOKEN_TTL_S = 600


async def _request(
    state: CliState, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
) -> httpx.Response:
    if not state.hub_url or not state.connection_string:
        raise BadRequest(
            "this command talks to a running hub: pass --hub-url and --connection-string (or set "
            "TETHER_HUB_URL and TETHER_CONNECTION_STRING)",
            field="hub_url",
        )
    cs = ServiceConnectionString.parse(state.connection_string)
    token = build_token(
        cs.host_name,
        cs.shared_access_key,
        int(time.time()) + TOKEN_TTL_S,
        policy_name=cs.shared_access_key_name,
    )
    async with httpx.AsyncClient(
        base_url=state.hub_url.rstrip("/"),
        verify=_verify(state),
        timeout=TIMEOUT_S,
        headers={"Authorization": token},
        params={"api-version": API_VERSION, **(params or {})},
    ) as client:
        response = await client.request(method, path, json=body)
    if response.status_code >= 400:
        raise error_from_response(response)
    return response


def _print(
    ctx: typer.Context, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
) -> None:
    async def call() -> Any:
        response = await _request(state_of(ctx), method, path, body, params)
        return response.json() if response.content else None

    result = run(call)
    if result is not None:
        echo_json(result)


def _json_option(text: str | None, name: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise typer.BadParameter(f"{name} must be JSON") from None


def _metrics(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, query = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter("--metric takes NAME=QUERY")
        out[name] = query
    return out


# --- tether upload ---------------------------------------------------------------------------------
@upload_app.command("settings")
def upload_settings(ctx: typer.Context) -> None:
    """The hub's file upload settings (no secrets)."""
    _print(ctx, "GET", "/tether/files/settings")


@upload_app.command("notifications")
def upload_notifications(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option("--timeout", min=0, max=60, help="Wait up to this long.")] = 0,
    complete: Annotated[
        bool, typer.Option("--complete", help="Complete (remove) what was received.")
    ] = False,
) -> None:
    """Receive a batch of file upload notifications (abandoned unless --complete)."""

    async def call() -> Any:
        state = state_of(ctx)
        response = await _request(
            state, "GET", "/messages/serviceBound/filenotifications", params={"timeout": str(timeout)}
        )
        if response.status_code == 204:
            return []
        lock = response.headers.get("ETag", "").strip('"')
        suffix = "" if complete else "/abandon"
        await _request(
            state,
            "DELETE" if complete else "POST",
            f"/messages/serviceBound/filenotifications/{lock}{suffix}",
        )
        return response.json()

    echo_json(run(call))


# --- tether job --------------------------------------------------------------------------------------
@job_app.command("create")
def job_create(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    query: Annotated[str, typer.Option("--query", help="Devices: a WHERE condition, or * for all.")],
    desired: Annotated[
        str | None, typer.Option("--desired", help="Twin update: desired properties (JSON).")
    ] = None,
    tags: Annotated[str | None, typer.Option("--tags", help="Twin update: tags (JSON).")] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="Device method job: the method name.")
    ] = None,
    payload: Annotated[str | None, typer.Option("--payload", help="Method payload (JSON).")] = None,
    response_timeout: Annotated[int, typer.Option("--response-timeout", min=5, max=300)] = 30,
    start: Annotated[str | None, typer.Option("--start", help="ISO 8601 start time (default now).")] = None,
    max_seconds: Annotated[int, typer.Option("--max-seconds", help="maxExecutionTimeInSeconds.")] = 3600,
) -> None:
    """Schedule a twin update (--desired/--tags) or a direct method (--method) over a query."""
    body: dict[str, Any] = {
        "jobId": job_id,
        "queryCondition": query,
        "startTime": start,
        "maxExecutionTimeInSeconds": max_seconds,
    }
    if method:
        body["type"] = "scheduleDeviceMethod"
        body["cloudToDeviceMethod"] = {
            "methodName": method,
            "payload": _json_option(payload, "--payload"),
            "responseTimeoutInSeconds": response_timeout,
        }
    else:
        twin: dict[str, Any] = {"etag": "*"}
        if desired:
            twin["properties"] = {"desired": _json_option(desired, "--desired")}
        if tags:
            twin["tags"] = _json_option(tags, "--tags")
        body["type"] = "scheduleUpdateTwin"
        body["updateTwin"] = twin
    _print(ctx, "PUT", f"/jobs/v2/{job_id}", body)


@job_app.command("show")
def job_show(ctx: typer.Context, job_id: str) -> None:
    """A scheduled job with its statistics (or an import/export job with --registry)."""
    _print(ctx, "GET", f"/jobs/v2/{job_id}")


@job_app.command("list")
def job_list(
    ctx: typer.Context,
    job_type: Annotated[
        str | None, typer.Option("--type", help="scheduleUpdateTwin | scheduleDeviceMethod")
    ] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    registry: Annotated[bool, typer.Option("--registry", help="List import/export jobs instead.")] = False,
) -> None:
    """Scheduled jobs, newest first (import/export jobs with --registry)."""
    if registry:
        _print(ctx, "GET", "/jobs")
        return
    params = {k: v for k, v in (("jobType", job_type), ("jobStatus", status)) if v}
    _print(ctx, "GET", "/jobs/v2/query", params=params)


@job_app.command("cancel")
def job_cancel(
    ctx: typer.Context,
    job_id: str,
    registry: Annotated[bool, typer.Option("--registry", help="An import/export job.")] = False,
) -> None:
    """Cancel a job; devices not yet reached are canceled."""
    if registry:
        _print(ctx, "DELETE", f"/jobs/{job_id}")
    else:
        _print(ctx, "POST", f"/jobs/v2/{job_id}/cancel")


@job_app.command("export")
def job_export(
    ctx: typer.Context,
    output: Annotated[str, typer.Option("--output", help="Container SAS URI to write devices.txt to.")],
    exclude_keys: Annotated[bool, typer.Option("--exclude-keys")] = False,
) -> None:
    """Export every device (and twin) to blob storage in Azure's format."""
    _print(
        ctx,
        "POST",
        "/jobs/create",
        {"type": "export", "outputBlobContainerUri": output, "excludeKeysInExport": exclude_keys},
    )


@job_app.command("import")
def job_import(
    ctx: typer.Context,
    source: Annotated[str, typer.Option("--input", help="Container SAS URI holding devices.txt.")],
    output: Annotated[str, typer.Option("--output", help="Container SAS URI for importErrors.log.")],
) -> None:
    """Import devices from blob storage (importMode per line, default createOrUpdate)."""
    _print(
        ctx,
        "POST",
        "/jobs/create",
        {"type": "import", "inputBlobContainerUri": source, "outputBlobContainerUri": output},
    )


# --- tether config -----------------------------------------------------------------------------------
@config_app.command("create")
def config_create(
    ctx: typer.Context,
    config_id: str,
    target: Annotated[str, typer.Option("--target", help="Target condition, e.g. tags.site='north'.")],
    content: Annotated[
        str, typer.Option("--content", help='deviceContent JSON, e.g. {"properties.desired.x": 1}.')
    ],
    priority: Annotated[int, typer.Option("--priority", min=0)] = 0,
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="NAME=QUERY (repeatable, at most 5).")
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE (repeatable).")] = None,
) -> None:
    """Create a configuration."""
    body = {
        "id": config_id,
        "targetCondition": target,
        "priority": priority,
        "content": {"deviceContent": _json_option(content, "--content")},
        "metrics": {"queries": _metrics(metric)},
        "labels": _metrics(label),
    }
    _print(ctx, "PUT", f"/configurations/{config_id}", body)


@config_app.command("show")
def config_show(ctx: typer.Context, config_id: str) -> None:
    """A configuration with its metrics."""
    _print(ctx, "GET", f"/configurations/{config_id}")


@config_app.command("list")
def config_list(ctx: typer.Context, top: Annotated[int, typer.Option("--top", min=1, max=100)] = 100) -> None:
    """Every configuration."""
    _print(ctx, "GET", "/configurations", params={"top": str(top)})


@config_app.command("delete")
def config_delete(ctx: typer.Context, config_id: str) -> None:
    """Delete a configuration (its devices take their next configuration)."""
    _print(ctx, "DELETE", f"/configurations/{config_id}")


@config_app.command("test")
def config_test(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option("--target")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="NAME=QUERY")] = None,
) -> None:
    """Check a target condition and metric queries without saving anything."""
    _print(
        ctx,
        "POST",
        "/configurations/testQueries",
        {"targetCondition": target or "", "customMetricQueries": _metrics(metric)},
    )
