"""AMQP end-to-end fixtures: one hub per module on 127.0.0.60 (this directory's address), the Node.js
SDK installed from tests/node/package-lock.json."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from amqp_helpers import AmqpHub, ensure_node_modules

IP = "127.0.0.60"


@pytest.fixture(scope="session")
def node_sdk() -> None:
    ensure_node_modules()


@pytest.fixture(scope="module")
def amqp_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqpHub]:
    hub = AmqpHub(Path(tmp_path_factory.mktemp("amqp-hub")), IP)
    try:
        yield hub
    finally:
        hub.stop()
