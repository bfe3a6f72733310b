"""The `backend` fixture: each end-to-end test here runs on `embedded` (SQLite + local stream) and on
`scaleout` (fresh PostgreSQL database + JetStream with unique names + the cluster bus on the same NATS;
skipped without those services, failed instead when CI=true)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_env import BackendSet, scaleout_backends
from e2e_kit import NodeThread, dev_pki, node_settings


@pytest.fixture(params=["embedded", "scaleout"])
def backend(request: pytest.FixtureRequest) -> Iterator[BackendSet]:
    if request.param == "embedded":
        yield BackendSet("embedded")
        return
    with scaleout_backends() as (backend, _):
        yield backend


@pytest.fixture
def node(backend: BackendSet, tmp_path: Path) -> Iterator[NodeThread]:
    """One hub node with every listener (HTTPS REST, MQTT/TLS, plain MQTT) on ephemeral ports."""
    settings = node_settings(tmp_path / "node", tmp_path / "pki", storage=backend.storage,
                             cluster=backend.cluster, node_id="solo")
    runner = NodeThread(settings)
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return dev_pki(tmp_path / "pki")[0]
