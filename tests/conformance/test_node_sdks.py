"""Microsoft's Node.js SDKs against the hub at 127.0.0.80 with nothing but a connection string
(`HostName=127.0.0.80`, no port: they dial 443) and the dev root in `NODE_EXTRA_CA_CERTS`:
`azure-iothub`'s Registry (a typed `DeviceNotFoundError` from Azure's error body, bulk update with the
`etag` Node sends, query paging, configurations with a quoted etag, applyConfigurationContent, an
export to the hub's Azurite and the job list as an array) and JobClient (a twin update job, the job
query as an array), a device over the HTTP transport (single and batch telemetry, C2D received on the
lower-case `devicebound` path and completed, `uploadToBlob`: block upload to Azurite and the
completion with the correlation id in the path) and over MQTT on WebSockets.

The packages are pinned in tests/conformance/node/package-lock.json and installed with `npm ci` into
its (git-ignored) node_modules on first use."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conformance_kit import API, AzureHub
from storage_kit import blob_bytes, container_sas_uri, take_notification

NODE_DIR = Path(__file__).resolve().parent / "node"


def _npm_ci() -> None:
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    assert npm, "Node.js and npm are needed for the Node SDK tests"
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600, capture_output=True
    )


@pytest.fixture(scope="module")
def node_sdks() -> Path:
    _npm_ci()
    return NODE_DIR


def test_node_sdks_work_with_a_plain_hostname(node_sdks: Path, azure_hub: AzureHub) -> None:
    device_id = f"node-dev-{uuid.uuid4().hex[:8]}"
    key = base64.b64encode(os.urandom(32)).decode()
    with azure_hub.rest() as rest:
        body = {
            "deviceId": device_id,
            "authentication": {
                "type": "sas",
                "symmetricKey": {
                    "primaryKey": key,
                    "secondaryKey": base64.b64encode(os.urandom(32)).decode(),
                },
            },
        }
        assert rest.put(f"/devices/{device_id}?{API}", json=body).status_code == 200
        assert (
            rest.post(f"/devices/{device_id}/messages/deviceBound?{API}", content=b"to-node").status_code
            == 201
        )
        export = f"node-export-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "EXPORT_URI": container_sas_uri(azure_hub, export),
            "NODE_EXTRA_CA_CERTS": str(azure_hub.root_ca),
            "OWNER_CS": azure_hub.owner_cs,
            "HUB_HOST": azure_hub.ip,
            "DEVICE_ID": device_id,
            "DEVICE_KEY": key,
        }
        node = shutil.which("node")
        assert node, "Node.js is needed for the Node SDK tests"
        run = subprocess.run(
            [node, "conformance.js"], cwd=node_sdks, env=env, capture_output=True, text=True, timeout=240
        )
        assert run.returncode == 0, run.stderr
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen.get("ok"), json.dumps(seen)
        assert seen["missing"] == "DeviceNotFoundError"
        assert seen["listed"] and seen["stats"]
        assert seen["bulk"] is True and seen["bulkStatus"] == "disabled"
        assert len(seen["query"]) == 1 and isinstance(seen["queryHasMore"], bool)
        assert seen["c2d"] == "to-node" and seen["twinReported"] is True
        # configurations, jobs and import/export through azure-iothub
        assert seen["configPriority"] == 2 and seen["configListed"] is True
        assert seen["configApplied"] == {"by": "node"} and seen["applied"] == "node"
        assert seen["jobStatus"] == "completed" and seen["jobTwin"] == 1 and seen["jobQueried"] is True
        assert seen["exportStatus"] == "completed" and seen["exportListed"] is True
        exported = [
            json.loads(line)["id"] for line in blob_bytes(azure_hub, export, "devices.txt").splitlines()
        ]
        assert {device_id, seen["fleetDevice"]} <= set(exported)
        # the device's file upload reached storage and the service's queue
        note, _ = take_notification(rest, f"{device_id}/node/hello.txt")
        assert note["deviceId"] == device_id and note["blobSizeInBytes"] == seen["uploaded"] > 0
        # the device's telemetry, one event per batch element, with its properties
        events = []
        for p in range(len(rest.get("/tether/events/partitions").json()["partitions"])):
            batch = rest.get(
                f"/tether/events/partitions/{p}/messages", params={"timeout": "0", "maxCount": "1000"}
            )
            events += [e for e in batch.json() if e["deviceId"] == device_id]
        assert [(e["body"], e["properties"]) for e in events] == [
            ('{"n":1}', {"zone": "single"}),
            ("a", {"zone": "b1"}),
            ("b", {"zone": "b2"}),
            ("ws", {"zone": "ws"}),
        ]
        assert rest.get(f"/devices/{device_id}?{API}").json()["cloudToDeviceMessageCount"] == 0  # completed
        assert rest.get(f"/twins/{device_id}?{API}").json()["properties"]["reported"]["node"] is True
