"""File upload routes: the device asks for a blob SAS and reports completion (device HTTPS, device
credentials), and the service drains the file upload notification queue (ServiceConnect).

Azure's device calls, as the SDKs send them: Python `POST /devices/{id}/files/notifications` with the
correlation id in the body, Node `POST /devices/{id}/files/notifications/{correlationId}` without it.
Azure delivers notifications over AMQP (`/messages/serviceBound/filenotifications`); the REST forms
here are Tether extensions with the same queue semantics as C2D feedback (batches under a lock token).
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tether.api.bodies import read_json_object
from tether.api.c2d_routes import _lock_token, _timeout
from tether.api.context import hub_of
from tether.api.device_routes import authenticate_device
from tether.api.devices import path_device_id
from tether.api.routes import Param, Route
from tether.errors import BadRequest
from tether.hub import Hub
from tether.messaging.feedback import MAX_WAIT_S
from tether.security.principal import Permission

__all__ = ["FILE_UPLOAD_ROUTES", "add_file_upload_routes"]

SERVICE: Final = Permission.service_connect
DEVICE: Final = Permission.device_connect
NOTIFICATION_CONTENT_TYPE: Final = "application/vnd.microsoft.iothub.filenotification.json"


class FileUploadSasRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    blob_name: str = Field(alias="blobName", description="Path of the blob under `{deviceId}/`.")


class FileUploadSasResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    correlation_id: str = Field(alias="correlationId")
    host_name: str = Field(alias="hostName", description="Storage host (may carry port and path, no scheme).")
    container_name: str = Field(alias="containerName")
    blob_name: str = Field(alias="blobName", description="`{deviceId}/{requested name}`.")
    sas_token: str = Field(alias="sasToken", description="`?…`: create + write on this blob only.")


class FileUploadCompletion(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    correlation_id: str | None = Field(None, alias="correlationId", description="Absent when in the path.")
    is_success: bool = Field(alias="isSuccess")
    status_code: int | None = Field(None, alias="statusCode")
    status_description: str | None = Field(None, alias="statusDescription")


class FileUploadNotification(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    device_id: str = Field(alias="deviceId")
    blob_uri: str = Field(alias="blobUri")
    blob_name: str = Field(alias="blobName")
    last_updated_time: str = Field(alias="lastUpdatedTime")
    blob_size_in_bytes: int = Field(alias="blobSizeInBytes")
    enqueued_time_utc: str = Field(alias="enqueuedTimeUtc")


async def create_sas(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    principal = await authenticate_device(request, device_id)
    body = await read_json_object(request)
    info = await hub_of(request).file_uploads.create_sas(device_id, body.get("blobName"),
                                                         actor=principal.name)
    return web.json_response(info.to_wire())


async def _complete(request: web.Request, correlation_id: Any) -> web.Response:
    device_id = path_device_id(request)
    principal = await authenticate_device(request, device_id)
    body = await read_json_object(request)
    if correlation_id is None:
        correlation_id = body.get("correlationId")
    success = body.get("isSuccess")
    if not isinstance(success, bool):
        raise BadRequest("isSuccess must be true or false", field="isSuccess")
    await hub_of(request).file_uploads.complete(
        device_id, correlation_id, is_success=success, status_code=body.get("statusCode"),
        status_description=body.get("statusDescription"), actor=principal.name)
    return web.Response(status=204)


async def complete_upload(request: web.Request) -> web.Response:
    return await _complete(request, None)


async def complete_upload_in_path(request: web.Request) -> web.Response:
    return await _complete(request, request.match_info["correlationId"])


async def receive_notifications(request: web.Request) -> web.Response:
    batch = await hub_of(request).file_uploads.notifications.receive(timeout_s=_timeout(request))
    if batch is None:
        return web.Response(status=204)
    return web.json_response(batch.to_wire(), content_type="application/json",
                             headers={"ETag": f'"{batch.lock_token}"'})


async def complete_notifications(request: web.Request) -> web.Response:
    await hub_of(request).file_uploads.notifications.complete(_lock_token(request))
    return web.Response(status=204)


async def abandon_notifications(request: web.Request) -> web.Response:
    await hub_of(request).file_uploads.notifications.abandon(_lock_token(request))
    return web.Response(status=204)


async def file_upload_settings(request: web.Request) -> web.Response:
    return web.json_response(hub_of(request).file_uploads.describe())


_NOTIFY = ("204 when recorded; 404 FileUploadNotFound for a correlation id this device has not "
           "in flight; 400 BlobNotFound when it reports success for a blob that is not in storage.")

FILE_UPLOAD_ROUTES: tuple[Route, ...] = (
    Route("POST", "/devices/{id}/files", create_sas, "Device: get a SAS URI for a file upload", DEVICE,
          "device-https", request=FileUploadSasRequest, response=FileUploadSasResponse, self_auth=True,
          description="The device uploads to `https://{hostName}/{containerName}/{blobName}{sasToken}`. "
                      "403 IotHubQuotaExceeded with too many uploads in flight; 400 "
                      "FileUploadNotConfigured when the hub has no storage account."),
    Route("POST", "/devices/{id}/files/notifications", complete_upload,
          "Device: notify a finished file upload", DEVICE, "device-https", request=FileUploadCompletion,
          status=204, self_auth=True, description=_NOTIFY),
    Route("POST", "/devices/{id}/files/notifications/{correlationId}", complete_upload_in_path,
          "Device: notify a finished file upload (correlation id in the path)", DEVICE, "device-https",
          request=FileUploadCompletion, status=204, self_auth=True, description=_NOTIFY),
    Route("GET", "/messages/serviceBound/filenotifications", receive_notifications,
          "Receive a batch of file upload notifications", SERVICE, "file-upload",
          response=FileUploadNotification, array=True, response_headers=("ETag",),
          params=(Param("timeout", "query", f"Long-poll up to this many seconds (0-{int(MAX_WAIT_S)}).",
                        {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}),),
          description="Tether extension (Azure: AMQP). Up to 64 notifications; ETag is the batch lock "
                      "token. 204 when there is none."),
    Route("DELETE", "/messages/serviceBound/filenotifications/{lockToken}", complete_notifications,
          "Complete (delete) a batch of file upload notifications", SERVICE, "file-upload", status=204,
          description="412 when the lock is unknown or expired."),
    Route("POST", "/messages/serviceBound/filenotifications/{lockToken}/abandon", abandon_notifications,
          "Abandon a batch of file upload notifications (offered again)", SERVICE, "file-upload", status=204,
          description="412 when the lock is unknown or expired."),
    Route("GET", "/tether/files/settings", file_upload_settings, "File upload settings (no secrets)",
          Permission.registry_read, "tether-file-upload", response="object"),
)


def add_file_upload_routes(app: web.Application, hub: Hub) -> None:
    from tether.api.app import mount  # not at import time: app.py imports this module

    mount(app, FILE_UPLOAD_ROUTES)
