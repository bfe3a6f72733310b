"""Jobs run once in a cluster: two `tether run` processes on one PostgreSQL database (and NATS), a
slow 300-device twin job; exactly one node leads (the `jobs` lease). `kill -9` of the leader mid-job:
the other node takes the lease after it runs out and finishes the job; devices finished before the
kill are not updated again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_env import scaleout_backends
from e2e_kit import HOSTNAME, Rest, dev_pki, new_key

from tether.cli.cluster import NodeProcess, NodeSpec, prepare_storage, stop_all, write_node_config
from tether.config import load_settings

pytestmark = pytest.mark.timeout(240)
API = "?api-version=2021-04-12"
FLEET = 300


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[dict[str, NodeProcess], Path]]:
    with scaleout_backends() as (backend, _):
        ca, cert, key = dev_pki(tmp_path / "pki")
        procs: dict[str, NodeProcess] = {}
        for name in ("a", "b"):
            spec = NodeSpec(
                f"node-{name}",
                tmp_path / f"node-{name}",
                {
                    "hub": {"hostname": HOSTNAME, "data_dir": str(tmp_path / f"node-{name}")},
                    "listeners": {"host": "127.0.0.1", "https_port": 0, "mqtt_port": 0, "amqp_port": 0},
                    "tls": {"cert_file": str(cert), "key_file": str(key)},
                    "storage": backend.storage,
                    "cluster": {**backend.cluster, "node_id": f"node-{name}"},
                    "jobs": {"concurrency": 1, "lease_ttl_s": 3, "poll_interval_s": 0.2},
                },
            )
            write_node_config(spec)
            procs[name] = NodeProcess(spec)
        settings = load_settings(
            hub={"hostname": HOSTNAME, "data_dir": tmp_path / "node-a"}, storage=backend.storage
        )
        owner = asyncio.run(prepare_storage(settings, create_database=False))  # migrations + policies, once
        for proc in procs.values():
            proc.connection_string = owner  # nodes never print it
        try:
            procs["a"].start()
            procs["a"].wait_ready(60)
            procs["b"].start()
            procs["b"].wait_ready(60)
            yield procs, ca
        finally:
            stop_all(list(procs.values()))


def test_leader_killed_mid_job_another_node_finishes_it(nodes: tuple[dict[str, NodeProcess], Path]) -> None:
    procs, ca = nodes
    a, b = procs["a"], procs["b"]
    rest_a = Rest(a.ports["https"], ca, a.connection_string)
    rest_b = Rest(b.ports["https"], ca, b.connection_string)
    try:
        records = "\n".join(
            f'{{"deviceId": "fo-{i:03d}", "authentication": {{"type": "sas", "symmetricKey": '
            f'{{"primaryKey": "{new_key()}", "secondaryKey": "{new_key()}"}}}}}}'
            for i in range(FLEET)
        )
        r = rest_a.client.post(
            f"/tether/devices/import{API}", content=records, headers={"Content-Type": "application/x-ndjson"}
        )
        assert r.status_code == 200, r.text
        r = rest_b.client.put(
            f"/jobs/v2/failover{API}",
            json={
                "jobId": "failover",
                "type": "scheduleUpdateTwin",
                "queryCondition": "*",
                "updateTwin": {"etag": "*", "properties": {"desired": {"ver": 7}}},
            },
        )
        assert r.status_code == 200, r.text

        deadline = time.monotonic() + 120
        while int(stats_of(rest_b)["succeededCount"]) < 20:  # type: ignore[call-overload]
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        # Which node leads? Its log says it took the jobs lease; exactly one did.
        assert _leads(a) != _leads(b)
        leader = a if _leads(a) else b
        survivor_rest = rest_b if leader is a else rest_a
        leader.kill9()
        before = stats_of(survivor_rest)
        assert int(before["succeededCount"]) < FLEET  # type: ignore[call-overload]

        deadline = time.monotonic() + 180
        while (s := stats_of(survivor_rest))["status"] != "completed":
            assert time.monotonic() < deadline, f"the surviving node did not finish the job: {s}"
            time.sleep(0.5)
        assert s["succeededCount"] == FLEET and s["failedCount"] == 0
        versions = [
            survivor_rest.client.get(f"/twins/fo-{i:03d}{API}").json()["properties"]["desired"]["$version"]
            for i in range(FLEET)
        ]
        assert sum(1 for v in versions if v != 2) <= 4  # at most the claimed-but-unrecorded batch
    finally:
        rest_a.close()
        rest_b.close()


def stats_of(rest: Rest) -> dict[str, object]:
    body = rest.client.get(f"/jobs/v2/failover{API}").json()
    return dict(body["deviceJobStatistics"], status=body["status"])


def _leads(node: NodeProcess) -> bool:
    """The node's log says when it takes the jobs lease."""
    return "lease jobs: leading" in node.stderr_tail(200_000) + _stdout(node)


def _stdout(node: NodeProcess) -> str:
    try:
        return node.out_file.read_text(errors="replace")
    except OSError:
        return ""
