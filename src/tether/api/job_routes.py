"""Jobs REST routes: scheduled twin updates and direct methods over a query (`/jobs/v2/…`), and
registry import/export through blob storage (`/jobs/create`, `/jobs`, `/jobs/{id}`).

Rights: reading needs RegistryRead; creating or cancelling needs RegistryReadWrite, and a
`scheduleDeviceMethod` job also ServiceConnect (it calls devices); refusals are audited.
`GET /jobs/v2/query` answers Azure's QueryResult object (`{"type", "items", "continuationToken"}`) to
the Python SDK (msrest) and a bare array to everyone else (Node, .NET read an array).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tether.api.auth import require_all
from tether.api.bodies import read_json_object, read_optional_json_object
from tether.api.context import hub_of, principal_of
from tether.api.routes import READ, WRITE, Param, Route
from tether.hub import Hub
from tether.security.principal import Permission

__all__ = ["JOB_ROUTES", "add_job_routes"]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


async def put_device_job(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    principal = principal_of(request)
    if body.get("type") == "scheduleDeviceMethod":
        await require_all(request, principal, [Permission.service_connect], what="a device method job")
    job = await hub_of(request).jobs.create_device_job(request.match_info["id"], body, actor=principal.name)
    return _json(job)


async def get_device_job(request: web.Request) -> web.Response:
    return _json(await hub_of(request).jobs.get_device_job(request.match_info["id"]))


async def cancel_device_job(request: web.Request) -> web.Response:
    jobs = hub_of(request).jobs
    return _json(await jobs.cancel_device_job(request.match_info["id"], actor=principal_of(request).name))


def _wants_query_result(request: web.Request) -> bool:
    agent = request.headers.get("User-Agent", "").lower()
    return "msrest" in agent or "iothubgatewayserviceapis" in agent


async def query_device_jobs(request: web.Request) -> web.Response:
    items = await hub_of(request).jobs.query_device_jobs(
        request.query.get("jobType"), request.query.get("jobStatus")
    )
    if _wants_query_result(request):
        return _json({"type": "jobResponse", "items": items, "continuationToken": None})
    return web.json_response(items, headers={"x-ms-item-type": "jobResponse"})


async def create_registry_job(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    return _json(await hub_of(request).jobs.create_registry_job(body, actor=principal_of(request).name))


async def list_registry_jobs(request: web.Request) -> web.Response:
    return _json(await hub_of(request).jobs.list_registry_jobs())


async def get_registry_job(request: web.Request) -> web.Response:
    return _json(await hub_of(request).jobs.get_registry_job(request.match_info["id"]))


async def cancel_registry_job(request: web.Request) -> web.Response:
    await read_optional_json_object(request)
    jobs = hub_of(request).jobs
    return _json(await jobs.cancel_registry_job(request.match_info["id"], actor=principal_of(request).name))


JOB_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/jobs/v2/query",
        query_device_jobs,
        "Query scheduled jobs",
        READ,
        "jobs",
        response="object",
        array=True,
        params=(
            Param("jobType", "query", "scheduleUpdateTwin | scheduleDeviceMethod."),
            Param("jobStatus", "query", "queued, scheduled, running, completed, failed, cancelled."),
        ),
        description="Newest first. The Python SDK (msrest) gets Azure's QueryResult object, others an array.",
    ),
    Route(
        "PUT",
        "/jobs/v2/{id}",
        put_device_job,
        "Create a scheduled twin update or device method job",
        WRITE,
        "jobs",
        request="object",
        response="object",
        description="JobRequest: `type` scheduleUpdateTwin (`updateTwin`) or scheduleDeviceMethod "
        "(`cloudToDeviceMethod`, also needs ServiceConnect), `queryCondition` (WHERE clause or "
        "`*`), `startTime`, `maxExecutionTimeInSeconds`. 409 JobAlreadyExists.",
    ),
    Route(
        "GET",
        "/jobs/v2/{id}",
        get_device_job,
        "Get a scheduled job with its statistics",
        READ,
        "jobs",
        response="object",
    ),
    Route(
        "POST",
        "/jobs/v2/{id}/cancel",
        cancel_device_job,
        "Cancel a scheduled job",
        WRITE,
        "jobs",
        response="object",
        description="Devices not yet reached are `canceled`.",
    ),
    Route(
        "POST",
        "/jobs/create",
        create_registry_job,
        "Create an import or export job",
        WRITE,
        "jobs",
        request="object",
        response="object",
        description="JobProperties: `type` export (`outputBlobContainerUri`, `excludeKeysInExport`) or "
        "import "
        "(`inputBlobContainerUri`, `outputBlobContainerUri`): container SAS URIs; blob "
        "`devices.txt`, one ExportImportDevice JSON per line.",
    ),
    Route(
        "GET",
        "/jobs",
        list_registry_jobs,
        "List import/export jobs",
        READ,
        "jobs",
        response="object",
        array=True,
    ),
    Route("GET", "/jobs/{id}", get_registry_job, "Get an import/export job", READ, "jobs", response="object"),
    Route(
        "DELETE",
        "/jobs/{id}",
        cancel_registry_job,
        "Cancel an import/export job",
        WRITE,
        "jobs",
        response="object",
    ),
)


def add_job_routes(app: web.Application, hub: Hub) -> None:
    from tether.api.app import mount  # not at import time: app.py imports this module

    mount(app, JOB_ROUTES)
