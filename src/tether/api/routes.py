"""The one route table: `build_app` registers it and `openapi.py` describes it, so the served
routes and the published spec cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from tether.api import admin, devices, openapi, query_routes, twin_routes
from tether.api.admin import AuditEntry, Policy, PolicyCreate
from tether.api.devices import BulkRegistryOperationResult, BulkRequest, ImportResult, StatusChange
from tether.api.twins import Twin
from tether.registry.models import Device, RegistryStatistics
from tether.security.principal import Permission

READ = Permission.registry_read
WRITE = Permission.registry_write
Body = type[BaseModel] | Literal["ndjson", "object"] | None


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: Literal["query", "header"]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    permission: Permission | None  # None: public, no Authorization needed
    tag: str
    request: Body = None
    request_required: bool = True
    response: Body = None
    array: bool = False  # the response is a JSON array of `response`
    status: int = 200
    params: tuple[Param, ...] = ()
    response_headers: tuple[str, ...] = ()
    description: str = ""
    # The handler authenticates by itself (device credentials or "any principal"); `permission`
    # then only documents the right it checks.
    self_auth: bool = False

    @property
    def extension(self) -> bool:
        """Tether-only routes live under /tether (plus the spec and health probe)."""
        return self.path.startswith("/tether") or self.permission is None


IF_MATCH = Param("If-Match", "header", 'Quoted etag (`"…"`) or `*`.')
KEY = Param("key", "query", "Which key to regenerate.",
            {"type": "string", "enum": list(devices.KEY_CHOICES), "default": "primary"})
KEYS = Param("keys", "query", "Include keys (needs RegistryReadWrite and ServiceConnect).",
             {"type": "boolean", "default": False})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Health(BaseModel):
    status: Literal["ok"]


ROUTES: tuple[Route, ...] = (
    # --- Azure IoT Hub service API --------------------------------------------------------------
    Route("PUT", "/devices/{id}", devices.put_device, "Create or replace a device identity", WRITE,
          "devices", request=Device, response=Device, params=(IF_MATCH,), response_headers=("ETag",),
          description="Without If-Match: create (409 DeviceAlreadyExists if it exists). With If-Match "
                      "etag or `*`: replace (404 if missing, 412 on a stale etag)."),
    Route("GET", "/devices/{id}", devices.get_device, "Get a device identity", READ, "devices",
          response=Device, response_headers=("ETag",),
          description="`cloudToDeviceMessageCount` is the live C2D queue depth."),
    Route("DELETE", "/devices/{id}", devices.delete_device, "Delete a device identity", WRITE, "devices",
          status=204, params=(IF_MATCH,),
          description="If-Match etag or `*`; a missing If-Match is unconditional (Tether leniency)."),
    Route("GET", "/devices", devices.list_devices, "List device identities in id order", READ, "devices",
          response=Device, array=True,
          params=(Param("top", "query", "Page size 1-1000 (out of range means 1000).",
                        {"type": "integer", "minimum": 1, "maximum": 1000}),
                  Param("x-ms-continuation", "header", "Last device id of the previous page.")),
          response_headers=("x-ms-continuation", "x-ms-item-type")),
    Route("POST", "/devices", devices.bulk_devices, "Bulk create, update or delete device identities",
          WRITE, "devices", request=BulkRequest, response=BulkRegistryOperationResult,
          description="Azure's bulk registry operation "
                      "(`IoTHubRegistryManager.bulk_create_or_update_devices`): an array of at most "
                      "100 ExportImportDevice entries, each id once. All or nothing: "
                      "200 with `isSuccessful: true` when every entry was applied, else 400 with "
                      "`isSuccessful: false` and an error per failed entry, and nothing written."),
    Route("GET", "/statistics/devices", devices.device_statistics, "Device counts", READ, "devices",
          response=RegistryStatistics),
    Route("GET", "/twins/{id}", twin_routes.get_twin, "Get a device twin", READ, "twins", response=Twin,
          response_headers=("ETag",)),
    Route("PATCH", "/twins/{id}", twin_routes.patch_twin, "Update tags and desired properties", WRITE,
          "twins", request="object", response=Twin, params=(IF_MATCH,), response_headers=("ETag",)),
    Route("PUT", "/twins/{id}", twin_routes.replace_twin, "Replace tags and desired properties", WRITE,
          "twins", request="object", response=Twin, params=(IF_MATCH,), response_headers=("ETag",)),
    Route("POST", "/devices/query", query_routes.query_devices, "Query device twins", READ, "twins",
          request=query_routes.QuerySpecification, response="object", array=True,
          params=(Param("x-ms-max-item-count", "header", "Page size, default 100, at most 1000."),
                  Param("x-ms-continuation", "header", "Token from the previous page.")),
          response_headers=("x-ms-continuation", "x-ms-item-type")),
    # --- Tether extensions ----------------------------------------------------------------------
    Route("POST", "/tether/devices/import", devices.import_devices, "Bulk-create devices (all or nothing)",
          WRITE, "tether-devices", request="ndjson", response=ImportResult,
          description="One device JSON object per line; body limit is 16x the normal limit. "
                      "Errors name `line N: field`; on any error nothing is imported."),
    Route("GET", "/tether/devices/export", devices.export_devices, "Export every device (keys included)",
          READ, "tether-devices", response="ndjson"),
    Route("POST", "/tether/devices/{id}/enable", devices.enable_device, "Enable a device", WRITE,
          "tether-devices", request=StatusChange, request_required=False, response=Device),
    Route("POST", "/tether/devices/{id}/disable", devices.disable_device,
          "Disable a device (its connections are dropped)", WRITE, "tether-devices",
          request=StatusChange, request_required=False, response=Device),
    Route("POST", "/tether/devices/{id}/regenerate-key", devices.regenerate_device_key,
          "Regenerate a device's symmetric key(s)", WRITE, "tether-devices", response=Device,
          params=(KEY,)),
    Route("GET", "/tether/policies", admin.list_policies, "List shared access policies", READ,
          "tether-policies", response=Policy, array=True, params=(KEYS,)),
    Route("GET", "/tether/policies/{name}", admin.get_policy, "Get a shared access policy", READ,
          "tether-policies", response=Policy, params=(KEYS,)),
    Route("PUT", "/tether/policies/{name}", admin.create_policy, "Create a shared access policy (owner only)",
          WRITE, "tether-policies", request=PolicyCreate, response=Policy, status=201,
          description="Needs all four rights. 409 if the policy exists."),
    Route("DELETE", "/tether/policies/{name}", admin.delete_policy, "Delete a shared access policy "
          "(owner only)", WRITE, "tether-policies", status=204),
    Route("POST", "/tether/policies/{name}/regenerate-key", admin.regenerate_policy_key,
          "Regenerate a policy's key(s) (owner only)", WRITE, "tether-policies", response=Policy,
          params=(KEY,)),
    Route("GET", "/tether/audit", admin.query_audit, "Query the audit log, newest first", READ,
          "tether-audit", response=AuditEntry, array=True,
          params=(Param("limit", "query", "1-1000, default 100.",
                        {"type": "integer", "minimum": 1, "maximum": 1000}),
                  Param("since", "query", "ISO 8601 date-time.", {"type": "string", "format": "date-time"}),
                  Param("outcome", "query", "allowed | refused | ok | failed."),
                  Param("action", "query", "Action prefix, e.g. `auth.` or `device.`."),
                  Param("principal", "query", "e.g. `policy:iothubowner`."))),
    Route("GET", "/openapi.json", openapi.serve_spec, "This OpenAPI 3.1 document", None, "meta",
          response="object"),
    Route("GET", "/healthz", healthz, "Liveness probe", None, "meta", response=Health),
)
