"""Automatic device configurations with `IoTHubConfigurationManager` (azure-iot-hub) on a hub on
127.0.0.118: two overlapping configurations, priority decides per device (Applied / Targeted in the
twin's `configurations`), the winner's desired properties reach the twin, metrics follow twin changes,
a deleted winner hands its devices to the next one and its settings are removed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.hub import IoTHubConfigurationManager
from azure.iot.hub.models import Configuration, ConfigurationContent, ConfigurationMetrics
from fleet_helpers import API, RunningHub, wait_for

IP = "127.0.0.118"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    running = RunningHub(Path(tmp_path_factory.mktemp("cfg-hub")), IP, jobs={"configuration_sweep_s": 3600})
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(running.ca_file)
    try:
        yield running
    finally:
        running.stop()
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous


def tag(hub: RunningHub, device_id: str, tags: dict[str, Any]) -> None:
    hub.call(hub.hub.twins.patch(device_id, {"tags": tags}, if_match=None, actor="test"))


def report(hub: RunningHub, device_id: str, reported: dict[str, Any]) -> None:
    hub.call(hub.hub.twins.update_reported(device_id, reported))


def twin(hub: RunningHub, device_id: str) -> dict[str, Any]:
    return hub.call(hub.hub.twins.get(device_id))


def status_of(hub: RunningHub, device_id: str) -> dict[str, str]:
    return {k: v["status"] for k, v in twin(hub, device_id).get("configurations", {}).items()}


def test_priority_decides_and_metrics_follow_twins(hub: RunningHub) -> None:
    for i in range(4):
        hub.create_device(f"cfg-{i}")
    tag(hub, "cfg-0", {"site": "north", "tier": "gold"})  # both configurations
    tag(hub, "cfg-1", {"site": "north"})  # only the low one
    tag(hub, "cfg-2", {"tier": "gold"})  # only the high one
    manager = IoTHubConfigurationManager.from_connection_string(hub.connection_string())
    low = Configuration(
        id="north-defaults",
        priority=1,
        target_condition="tags.site = 'north'",
        labels={"team": "ops"},
        content=ConfigurationContent(device_content={"properties.desired.settings": {"interval": 60}}),
        metrics=ConfigurationMetrics(
            queries={"current": "SELECT deviceId FROM devices WHERE properties.reported.interval = 60"}
        ),
    )
    high = Configuration(
        id="gold-fast",
        priority=10,
        target_condition="tags.tier = 'gold'",
        content=ConfigurationContent(
            device_content={"properties.desired.settings": {"interval": 5}, "properties.desired.gold": True}
        ),
    )
    created_low = manager.create_configuration(low)
    assert created_low.etag and created_low.created_time_utc
    manager.create_configuration(high)

    wait_for(
        lambda: status_of(hub, "cfg-0") == {"gold-fast": "Applied", "north-defaults": "Targeted"},
        what="cfg-0 decided",
    )
    wait_for(lambda: status_of(hub, "cfg-1") == {"north-defaults": "Applied"}, what="cfg-1 decided")
    wait_for(lambda: status_of(hub, "cfg-2") == {"gold-fast": "Applied"}, what="cfg-2 decided")
    assert status_of(hub, "cfg-3") == {}
    assert twin(hub, "cfg-0")["properties"]["desired"]["settings"] == {"interval": 5}
    assert twin(hub, "cfg-1")["properties"]["desired"]["settings"] == {"interval": 60}

    def metrics(config_id: str) -> tuple[dict[str, int], dict[str, int]]:
        c = manager.get_configuration(config_id)
        return c.system_metrics.results, c.metrics.results

    wait_for(
        lambda: metrics("north-defaults") == ({"targetedCount": 2, "appliedCount": 1}, {"current": 0}),
        what="north-defaults metrics",
    )
    assert metrics("gold-fast")[0] == {"targetedCount": 2, "appliedCount": 2}

    # twins change: cfg-3 joins the north, cfg-1 reports the setting
    tag(hub, "cfg-3", {"site": "north"})
    report(hub, "cfg-1", {"interval": 60})
    wait_for(
        lambda: metrics("north-defaults") == ({"targetedCount": 3, "appliedCount": 2}, {"current": 1}),
        what="metrics after twin changes",
    )
    assert twin(hub, "cfg-3")["properties"]["desired"]["settings"] == {"interval": 60}

    # the query language sees the configurations section
    with hub.rest("registryRead") as rest:
        r = rest.post(
            f"/devices/query{API}",
            json={
                "query": "SELECT deviceId FROM devices WHERE configurations.[[gold-fast]].status = 'Applied'"
            },
        )
        assert sorted(x["deviceId"] for x in r.json()) == ["cfg-0", "cfg-2"]

    # priority change (If-Match from the SDK, unquoted): the low one now wins on cfg-0
    current = manager.get_configuration("north-defaults")
    current.priority = 20
    updated = manager.update_configuration(current, etag=current.etag)
    assert updated.priority == 20 and updated.etag != current.etag
    wait_for(
        lambda: status_of(hub, "cfg-0") == {"gold-fast": "Targeted", "north-defaults": "Applied"},
        what="cfg-0 after the priority change",
    )
    desired = twin(hub, "cfg-0")["properties"]["desired"]
    assert desired["settings"] == {"interval": 60} and "gold" not in desired  # gold-fast's settings removed

    # content is fixed after creation
    current = manager.get_configuration("north-defaults")
    current.content = ConfigurationContent(device_content={"properties.desired.settings": {"interval": 1}})
    with pytest.raises(Exception):  # noqa: B017 - msrest HttpOperationError (400)
        manager.update_configuration(current, etag=current.etag)

    # deleting the winner hands cfg-0 back to gold-fast
    manager.delete_configuration("north-defaults")
    wait_for(lambda: status_of(hub, "cfg-0") == {"gold-fast": "Applied"}, what="cfg-0 after the delete")
    wait_for(lambda: status_of(hub, "cfg-1") == {}, what="cfg-1 after the delete")
    assert twin(hub, "cfg-0")["properties"]["desired"]["settings"] == {"interval": 5}
    assert "settings" not in twin(hub, "cfg-1")["properties"]["desired"]
    assert [c.id for c in manager.get_configurations(10)] == ["gold-fast"]


def test_test_queries_and_apply_content(hub: RunningHub) -> None:
    manager = IoTHubConfigurationManager.from_connection_string(hub.connection_string())
    from azure.iot.hub.models import ConfigurationQueriesTestInput

    result = manager.test_configuration_queries(
        ConfigurationQueriesTestInput(
            target_condition="tags.x = ",
            custom_metric_queries={"ok": "SELECT deviceId FROM devices", "bad": "SELECT FROM"},
        )
    )
    assert result.target_condition_error and "bad" in result.custom_metric_query_errors
    assert "ok" not in (result.custom_metric_query_errors or {})
    hub.create_device("cfg-apply")
    manager.apply_configuration_on_edge_device(
        "cfg-apply", ConfigurationContent(device_content={"properties.desired.direct": {"on": True}})
    )
    assert twin(hub, "cfg-apply")["properties"]["desired"]["direct"] == {"on": True}


def test_apply_content_writes_module_twins_and_checks_every_module_first(hub: RunningHub) -> None:
    """`applyConfigurationContent` with `modulesContent` (an IoT Edge deployment on one device): each
    module's twin gets its desired properties; a missing module is 404 before anything is written, and
    automatic configurations still refuse module content with a clear 400."""
    manager = IoTHubConfigurationManager.from_connection_string(hub.connection_string())
    hub.create_device("cfg-edge")
    for module_id in ("agent", "camera"):
        hub.call(hub.hub.modules.create("cfg-edge", module_id, {}, actor="test"))
    manager.apply_configuration_on_edge_device("cfg-edge", ConfigurationContent(
        device_content={"properties.desired.site": "north"},
        modules_content={"agent": {"properties.desired": {"schemaVersion": "1.1", "modules": {"camera": {}}}},
                         "camera": {"properties.desired.fps": 30}},
    ))
    assert twin(hub, "cfg-edge")["properties"]["desired"]["site"] == "north"
    agent = hub.call(hub.hub.twins.get("cfg-edge", "agent"))["properties"]["desired"]
    assert agent["schemaVersion"] == "1.1" and agent["modules"] == {"camera": {}}
    assert hub.call(hub.hub.twins.get("cfg-edge", "camera"))["properties"]["desired"]["fps"] == 30
    with hub.rest("iothubowner") as rest:
        modules = {"camera": {"properties.desired.fps": 5}, "ghost": {"properties.desired.x": 1}}
        content = {"deviceContent": {"properties.desired.site": "south"}, "modulesContent": modules}
        r = rest.post(f"/devices/cfg-edge/applyConfigurationContent{API}", json=content)
        assert r.status_code == 404 and r.json()["errorCode"] == "ModuleNotFound", r.text
        module_config = {"id": "edge-deploy", "priority": 1, "targetCondition": "*",
                         "content": {"modulesContent": {"camera": {"properties.desired.fps": 1}}}}
        r = rest.put(f"/configurations/edge-deploy{API}", json=module_config)
        assert r.status_code == 400 and "applyConfigurationContent" in r.json()["message"], r.text
    assert twin(hub, "cfg-edge")["properties"]["desired"]["site"] == "north"  # nothing written
    assert hub.call(hub.hub.twins.get("cfg-edge", "camera"))["properties"]["desired"]["fps"] == 30


def test_configuration_calls_need_the_right_permissions(hub: RunningHub) -> None:
    body = {"id": "denied", "priority": 1, "targetCondition": "*", "content": {"deviceContent": {}}}
    with hub.rest("registryRead") as reader:
        assert reader.put(f"/configurations/denied{API}", json=body).status_code == 403
        assert reader.get(f"/configurations{API}").status_code == 200
    with hub.rest("service") as service:
        assert service.get(f"/configurations{API}").status_code == 403
    refused = hub.audit("auth.rest", "refused")
    assert any(r.principal == "policy:registryRead" for r in refused)
    assert any(r.principal == "policy:service" for r in refused)


def test_cli_config_and_job_commands(hub: RunningHub) -> None:
    import json

    from typer.testing import CliRunner

    from tether.cli.main import app

    base = ["--hub-url", f"https://{IP}", "--connection-string", hub.connection_string(),
            "--ca-file", str(hub.ca_file)]
    runner = CliRunner()
    created = runner.invoke(app, [*base, "config", "create", "cli-cfg", "--target", "tags.cli = true",
                                  "--content", '{"properties.desired.fromCli": 1}', "--priority", "3",
                                  "--metric", "all=SELECT deviceId FROM devices"])
    assert created.exit_code == 0, created.output
    assert json.loads(created.output)["priority"] == 3
    listed = runner.invoke(app, [*base, "config", "list"])
    assert "cli-cfg" in [c["id"] for c in json.loads(listed.output)]
    tested = runner.invoke(app, [*base, "config", "test", "--target", "tags.x ="])
    assert json.loads(tested.output)["targetConditionError"]
    assert runner.invoke(app, [*base, "config", "delete", "cli-cfg"]).exit_code == 0
    job = runner.invoke(app, [*base, "job", "create", "cli-job", "--query", "deviceId = 'none'",
                              "--desired", '{"a": 1}'])
    assert job.exit_code == 0, job.output
    assert json.loads(runner.invoke(app, [*base, "job", "show", "cli-job"]).output)["jobId"] == "cli-job"
    missing = runner.invoke(app, [*base, "config", "show", "nope"])
    assert missing.exit_code == 1
