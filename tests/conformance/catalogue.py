"""Every operation of Azure IoT Hub's data plane that an SDK can call, and which Python SDK methods call it.

REST operations are Azure's published REST specification for api-version 2021-04-12
(`iothub-service.json`, the document azure-iot-hub's protocol layer is generated from: the suite checks
that every operation of that layer is listed here) plus the device REST API. Their status is **not**
written here: it is read from Tether's route table (`tether.api.app.FEATURES`): a route that is not
`not_yet` is supported, a `not_yet` route answers 501 NotImplemented. Operations on other transports
(MQTT, AMQP) declare their status here and the suite exercises them with the Python device SDK.

An operation's `also` lists the other requests Tether serves for it: another SDK's spelling of a REST
operation (Node's file upload completion), or Tether's REST form of an AMQP operation (C2D send, file
upload notifications). Every Azure-style route of the hub is some operation's path or `also`, and the
operation's probe exercises them all.

To mark an operation supported once it is built: implement its route (and delete its `not_yet` line),
add a probe for it in `test_rest_operations.py` and a call in `test_sdk_methods.py`, then run
`python tests/conformance/sdk_table.py --write` to regenerate the table in docs/api.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Status = Literal["supported", "not yet"]

REGISTRY = "IoTHubRegistryManager"
JOBS = "IoTHubJobManager"
CONFIGS = "IoTHubConfigurationManager"
RUNTIME = "IoTHubHttpRuntimeManager"
DIGITAL = "DigitalTwinClient"
DEVICE = "IoTHubDeviceClient"
MODULE = "IoTHubModuleClient"


@dataclass(frozen=True, slots=True)
class Operation:
    name: str  # Azure's operation id (REST) or a descriptive id (other transports)
    method: str  # HTTP method, or "MQTT" / "AMQP" / "AUTH" (how a client authenticates)
    path: str  # REST path template as in the specification, or the topic / link
    area: str
    sdk: tuple[str, ...] = ()  # Python SDK methods ("Class.method") that call it
    status: Status | None = None  # non-REST operations only; REST ones come from the route table
    needs: str = ""  # for REST routes that exist but cannot work yet (what they wait for)
    note: str = ""
    also: tuple[tuple[str, str], ...] = ()  # other (method, path) requests Tether serves for it

    @property
    def rest(self) -> bool:
        return self.method in ("GET", "PUT", "POST", "PATCH", "DELETE")


def shape(method: str, path: str) -> tuple[str, str]:
    """A route's identity for matching: method, and the path with lower-case literals and anonymous
    parameters (`/twins/{deviceId}/methods` and `/twins/{id}/methods` are one route)."""
    return method.upper(), re.sub(r"\{[^}]*\}", "{}", path).lower().rstrip("/")


OPERATIONS: tuple[Operation, ...] = (
    # --- how service clients authenticate -----------------------------------------------------------
    Operation(
        "Service_SharedAccessSignature",
        "AUTH",
        "Authorization: SharedAccessSignature …&skn={policy}",
        "service auth",
        tuple(f"{c}.from_connection_string" for c in (REGISTRY, JOBS, CONFIGS, RUNTIME, DIGITAL)),
        status="supported",
    ),
    Operation(
        "Service_AzureActiveDirectory",
        "AUTH",
        "Authorization: Bearer {Azure AD token}",
        "service auth",
        tuple(f"{c}.from_token_credential" for c in (REGISTRY, JOBS, CONFIGS, RUNTIME, DIGITAL)),
        status="not yet",
        note="not verified with the SDK: Tether accepts bearer tokens only from an OIDC provider configured "
        "in `operators.oidc` (e.g. Entra ID, docs/security.md); any other token is a 401",
    ),
    # --- device identities ---------------------------------------------------------------------------
    Operation("Devices_GetDevices", "GET", "/devices", "devices", (f"{REGISTRY}.get_devices",)),
    Operation("Devices_GetIdentity", "GET", "/devices/{id}", "devices", (f"{REGISTRY}.get_device",)),
    Operation(
        "Devices_CreateOrUpdateIdentity",
        "PUT",
        "/devices/{id}",
        "devices",
        (
            f"{REGISTRY}.create_device_with_sas",
            f"{REGISTRY}.create_device_with_x509",
            f"{REGISTRY}.create_device_with_certificate_authority",
            f"{REGISTRY}.update_device_with_sas",
            f"{REGISTRY}.update_device_with_x509",
            f"{REGISTRY}.update_device_with_certificate_authority",
        ),
    ),
    Operation("Devices_DeleteIdentity", "DELETE", "/devices/{id}", "devices", (f"{REGISTRY}.delete_device",)),
    Operation(
        "BulkRegistry_UpdateRegistry",
        "POST",
        "/devices",
        "devices",
        (f"{REGISTRY}.bulk_create_or_update_devices",),
        note="all or nothing",
    ),
    Operation(
        "Statistics_GetDeviceStatistics",
        "GET",
        "/statistics/devices",
        "devices",
        (f"{REGISTRY}.get_device_registry_statistics",),
    ),
    Operation(
        "Statistics_GetServiceStatistics",
        "GET",
        "/statistics/service",
        "devices",
        (f"{REGISTRY}.get_service_statistics",),
    ),
    # --- twins, query, methods ----------------------------------------------------------------------
    Operation("Devices_GetTwin", "GET", "/twins/{id}", "twins", (f"{REGISTRY}.get_twin",)),
    Operation("Devices_ReplaceTwin", "PUT", "/twins/{id}", "twins", (f"{REGISTRY}.replace_twin",)),
    Operation("Devices_UpdateTwin", "PATCH", "/twins/{id}", "twins", (f"{REGISTRY}.update_twin",)),
    Operation("Query_GetTwins", "POST", "/devices/query", "twins", (f"{REGISTRY}.query_iot_hub",)),
    Operation(
        "Devices_InvokeMethod",
        "POST",
        "/twins/{deviceId}/methods",
        "methods",
        (f"{REGISTRY}.invoke_device_method",),
    ),
    Operation(
        "Modules_InvokeMethod",
        "POST",
        "/twins/{deviceId}/modules/{moduleId}/methods",
        "methods",
        (f"{REGISTRY}.invoke_device_module_method",),
    ),
    # --- cloud-to-device ----------------------------------------------------------------------------
    Operation(
        "CloudToDeviceMessages_PurgeCloudToDeviceMessageQueue", "DELETE", "/devices/{id}/commands", "c2d"
    ),
    Operation(
        "CloudToDeviceMessages_ReceiveFeedbackNotification",
        "GET",
        "/messages/serviceBound/feedback",
        "c2d",
        (f"{RUNTIME}.receive_feedback_notification",),
    ),
    Operation(
        "CloudToDeviceMessages_CompleteFeedbackNotification",
        "DELETE",
        "/messages/serviceBound/feedback/{lockToken}",
        "c2d",
        (f"{RUNTIME}.complete_feedback_notification",),
    ),
    Operation(
        "CloudToDeviceMessages_AbandonFeedbackNotification",
        "POST",
        "/messages/serviceBound/feedback/{lockToken}/abandon",
        "c2d",
        (f"{RUNTIME}.abandon_feedback_notification",),
    ),
    Operation(
        "C2D_Send",
        "AMQP",
        "/messages/devicebound",
        "c2d",
        (f"{REGISTRY}.send_c2d_message",),
        status="supported",
        note="over AMQP (5671, SASL MSSBCBS + CBS); also the REST form",
        also=(("POST", "/devices/{id}/messages/deviceBound"),),
    ),
    # --- modules ------------------------------------------------------------------------------------
    Operation(
        "Modules_GetModulesOnDevice", "GET", "/devices/{id}/modules", "modules", (f"{REGISTRY}.get_modules",)
    ),
    Operation(
        "Modules_GetIdentity", "GET", "/devices/{id}/modules/{mid}", "modules", (f"{REGISTRY}.get_module",)
    ),
    Operation(
        "Modules_CreateOrUpdateIdentity",
        "PUT",
        "/devices/{id}/modules/{mid}",
        "modules",
        (
            f"{REGISTRY}.create_module_with_sas",
            f"{REGISTRY}.create_module_with_x509",
            f"{REGISTRY}.create_module_with_certificate_authority",
            f"{REGISTRY}.update_module_with_sas",
            f"{REGISTRY}.update_module_with_x509",
            f"{REGISTRY}.update_module_with_certificate_authority",
        ),
    ),
    Operation(
        "Modules_DeleteIdentity",
        "DELETE",
        "/devices/{id}/modules/{mid}",
        "modules",
        (f"{REGISTRY}.delete_module",),
    ),
    Operation(
        "Modules_GetTwin", "GET", "/twins/{id}/modules/{mid}", "modules", (f"{REGISTRY}.get_module_twin",)
    ),
    Operation(
        "Modules_ReplaceTwin",
        "PUT",
        "/twins/{id}/modules/{mid}",
        "modules",
        (f"{REGISTRY}.replace_module_twin",),
    ),
    Operation(
        "Modules_UpdateTwin",
        "PATCH",
        "/twins/{id}/modules/{mid}",
        "modules",
        (f"{REGISTRY}.update_module_twin",),
    ),
    # --- configurations -----------------------------------------------------------------------------
    Operation(
        "Configuration_Get",
        "GET",
        "/configurations/{id}",
        "configurations",
        (f"{CONFIGS}.get_configuration",),
    ),
    Operation(
        "Configuration_CreateOrUpdate",
        "PUT",
        "/configurations/{id}",
        "configurations",
        (f"{CONFIGS}.create_configuration", f"{CONFIGS}.update_configuration"),
    ),
    Operation(
        "Configuration_Delete",
        "DELETE",
        "/configurations/{id}",
        "configurations",
        (f"{CONFIGS}.delete_configuration",),
    ),
    Operation(
        "Configuration_GetConfigurations",
        "GET",
        "/configurations",
        "configurations",
        (f"{CONFIGS}.get_configurations",),
    ),
    Operation(
        "Configuration_TestQueries",
        "POST",
        "/configurations/testQueries",
        "configurations",
        (f"{CONFIGS}.test_configuration_queries",),
    ),
    Operation(
        "Configuration_ApplyOnEdgeDevice",
        "POST",
        "/devices/{id}/applyConfigurationContent",
        "configurations",
        (f"{CONFIGS}.apply_configuration_on_edge_device",),
        note="`deviceContent` to the device twin, `modulesContent` to module twins; the second path is "
        "no SDK's (an older form)",
        also=(("POST", "/devices/applyConfigurationContent/{id}"),),
    ),
    # --- jobs ---------------------------------------------------------------------------------------
    Operation(
        "Jobs_CreateImportExportJob", "POST", "/jobs/create", "jobs", (f"{JOBS}.create_import_export_job",)
    ),
    Operation("Jobs_GetImportExportJobs", "GET", "/jobs", "jobs", (f"{JOBS}.get_import_export_jobs",)),
    Operation("Jobs_GetImportExportJob", "GET", "/jobs/{id}", "jobs", (f"{JOBS}.get_import_export_job",)),
    Operation(
        "Jobs_CancelImportExportJob", "DELETE", "/jobs/{id}", "jobs", (f"{JOBS}.cancel_import_export_job",)
    ),
    Operation("Jobs_GetScheduledJob", "GET", "/jobs/v2/{id}", "jobs", (f"{JOBS}.get_scheduled_job",)),
    Operation("Jobs_CreateScheduledJob", "PUT", "/jobs/v2/{id}", "jobs", (f"{JOBS}.create_scheduled_job",)),
    Operation(
        "Jobs_CancelScheduledJob", "POST", "/jobs/v2/{id}/cancel", "jobs", (f"{JOBS}.cancel_scheduled_job",)
    ),
    Operation("Jobs_QueryScheduledJobs", "GET", "/jobs/v2/query", "jobs", (f"{JOBS}.query_scheduled_jobs",)),
    # --- digital twins ------------------------------------------------------------------------------
    Operation(
        "DigitalTwin_GetDigitalTwin",
        "GET",
        "/digitaltwins/{id}",
        "digital twins",
        (f"{DIGITAL}.get_digital_twin",),
    ),
    Operation(
        "DigitalTwin_UpdateDigitalTwin",
        "PATCH",
        "/digitaltwins/{id}",
        "digital twins",
        (f"{DIGITAL}.update_digital_twin",),
    ),
    Operation(
        "DigitalTwin_InvokeRootLevelCommand",
        "POST",
        "/digitaltwins/{id}/commands/{commandName}",
        "digital twins",
        (f"{DIGITAL}.invoke_command",),
    ),
    Operation(
        "DigitalTwin_InvokeComponentCommand",
        "POST",
        "/digitaltwins/{id}/components/{componentPath}/commands/{commandName}",
        "digital twins",
        (f"{DIGITAL}.invoke_component_command",),
    ),
    # --- device REST API (HTTPS as the device) ------------------------------------------------------
    Operation(
        "Device_SendDeviceEvent",
        "POST",
        "/devices/{id}/messages/events",
        "device https",
        note="single message, or a batch (`application/vnd.microsoft.iothub.json`)",
    ),
    Operation(
        "Module_SendModuleEvent",
        "POST",
        "/devices/{id}/modules/{mid}/messages/events",
        "device https",
        note="authenticated as the module",
    ),
    Operation(
        "Device_ReceiveDeviceBoundNotification", "GET", "/devices/{id}/messages/devicebound", "device https"
    ),
    Operation(
        "Device_CompleteDeviceBoundNotification",
        "DELETE",
        "/devices/{id}/messages/devicebound/{etag}",
        "device https",
        note="`?reject` rejects",
    ),
    Operation(
        "Device_AbandonDeviceBoundNotification",
        "POST",
        "/devices/{id}/messages/devicebound/{etag}/abandon",
        "device https",
    ),
    Operation(
        "Device_CreateFileUploadSasUri",
        "POST",
        "/devices/{id}/files",
        "device https",
        (f"{DEVICE}.get_storage_info_for_blob",),
        note="needs a storage account (`file_upload` settings); the SAS is for one blob, create and write",
    ),
    Operation(
        "Device_UpdateFileUploadStatus",
        "POST",
        "/devices/{id}/files/notifications",
        "device https",
        (f"{DEVICE}.notify_blob_upload_status",),
        note="the second form is Node's (correlation id in the path)",
        also=(("POST", "/devices/{id}/files/notifications/{correlationId}"),),
    ),
    Operation(
        "FileUpload_ReceiveNotifications",
        "AMQP",
        "/messages/serviceBound/filenotifications",
        "file upload",
        status="supported",
        note="over AMQP (5671; Node's `getFileNotificationReceiver`, no Python SDK method: exercised by "
        "tests/amqp with azure-iothub); also the REST form, a queue like C2D feedback",
        also=(
            ("GET", "/messages/serviceBound/filenotifications"),
            ("DELETE", "/messages/serviceBound/filenotifications/{lockToken}"),
            ("POST", "/messages/serviceBound/filenotifications/{lockToken}/abandon"),
        ),
    ),
    # --- device protocols (MQTT on 8883, MQTT over WebSockets on 443) -------------------------------
    Operation(
        "Device_Connect",
        "MQTT",
        "CONNECT (8883; WebSockets: 443 /$iothub/websocket)",
        "device mqtt",
        (
            f"{DEVICE}.create_from_connection_string",
            f"{DEVICE}.create_from_symmetric_key",
            f"{DEVICE}.create_from_sastoken",
            f"{DEVICE}.create_from_x509_certificate",
            f"{DEVICE}.connect",
            f"{DEVICE}.disconnect",
            f"{DEVICE}.shutdown",
            f"{DEVICE}.connected",
            f"{DEVICE}.update_sastoken",
            f"{DEVICE}.on_new_sastoken_required",
            f"{DEVICE}.on_connection_state_change",
            f"{DEVICE}.on_background_exception",
        ),
        status="supported",
    ),
    Operation(
        "Device_SendEvent",
        "MQTT",
        "devices/{id}/messages/events/{properties}",
        "device mqtt",
        (f"{DEVICE}.send_message",),
        status="supported",
    ),
    Operation(
        "Device_ReceiveC2D",
        "MQTT",
        "devices/{id}/messages/devicebound/#",
        "device mqtt",
        (f"{DEVICE}.receive_message", f"{DEVICE}.on_message_received"),
        status="supported",
    ),
    Operation(
        "Device_GetTwin",
        "MQTT",
        "$iothub/twin/GET/",
        "device mqtt",
        (f"{DEVICE}.get_twin",),
        status="supported",
    ),
    Operation(
        "Device_UpdateReported",
        "MQTT",
        "$iothub/twin/PATCH/properties/reported/",
        "device mqtt",
        (f"{DEVICE}.patch_twin_reported_properties",),
        status="supported",
    ),
    Operation(
        "Device_DesiredPatch",
        "MQTT",
        "$iothub/twin/PATCH/properties/desired/#",
        "device mqtt",
        (
            f"{DEVICE}.receive_twin_desired_properties_patch",
            f"{DEVICE}.on_twin_desired_properties_patch_received",
        ),
        status="supported",
    ),
    Operation(
        "Device_DirectMethod",
        "MQTT",
        "$iothub/methods/POST/#",
        "device mqtt",
        (
            f"{DEVICE}.receive_method_request",
            f"{DEVICE}.on_method_request_received",
            f"{DEVICE}.send_method_response",
        ),
        status="supported",
    ),
    # --- module protocols (IoTHubModuleClient: MQTT on 8883, WebSockets on 443) ------------------------
    Operation(
        "Module_Connect",
        "MQTT",
        "CONNECT as {device}/{module} (8883; WebSockets: 443)",
        "module mqtt",
        (
            f"{MODULE}.create_from_connection_string",
            f"{MODULE}.create_from_sastoken",
            f"{MODULE}.create_from_x509_certificate",
            f"{MODULE}.connect",
            f"{MODULE}.disconnect",
            f"{MODULE}.shutdown",
            f"{MODULE}.connected",
            f"{MODULE}.update_sastoken",
            f"{MODULE}.on_new_sastoken_required",
            f"{MODULE}.on_connection_state_change",
            f"{MODULE}.on_background_exception",
        ),
        status="supported",
    ),
    Operation(
        "Module_SendEvent",
        "MQTT",
        "devices/{id}/modules/{mid}/messages/events/{properties}",
        "module mqtt",
        (f"{MODULE}.send_message", f"{MODULE}.send_message_to_output"),
        status="supported",
        note="an output name travels as `iothub-outputname`",
    ),
    Operation(
        "Module_Twin",
        "MQTT",
        "$iothub/twin/… (the module twin)",
        "module mqtt",
        (
            f"{MODULE}.get_twin",
            f"{MODULE}.patch_twin_reported_properties",
            f"{MODULE}.receive_twin_desired_properties_patch",
            f"{MODULE}.on_twin_desired_properties_patch_received",
        ),
        status="supported",
    ),
    Operation(
        "Module_DirectMethod",
        "MQTT",
        "$iothub/methods/POST/#",
        "module mqtt",
        (
            f"{MODULE}.receive_method_request",
            f"{MODULE}.on_method_request_received",
            f"{MODULE}.send_method_response",
        ),
        status="supported",
    ),
    Operation(
        "Module_EdgeRouting",
        "MQTT",
        "devices/{id}/modules/{mid}/inputs/#; edgeHub method calls",
        "module mqtt",
        (
            f"{MODULE}.receive_message_on_input",
            f"{MODULE}.on_message_received",
            f"{MODULE}.create_from_edge_environment",
            f"{MODULE}.invoke_method",
        ),
        status="not yet",
        note="IoT Edge features (module inputs are fed by edgeHub routes): subscribing works, nothing "
        "arrives; `create_from_edge_environment` and `invoke_method` need an edge runtime",
    ),
)

SDK_CLASSES = (REGISTRY, JOBS, CONFIGS, RUNTIME, DIGITAL, DEVICE, MODULE)


def by_name() -> dict[str, Operation]:
    return {op.name: op for op in OPERATIONS}
