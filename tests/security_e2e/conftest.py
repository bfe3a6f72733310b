"""Fixtures for the connection-security end-to-end tests (helpers live in e2e_helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from e2e_helpers import running_hub

from tether.hub import Hub


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def hub(data_dir: Path) -> AsyncIterator[Hub]:
    """A real hub (SQLite + file stream in a temp data dir, dev PKI) serving HTTPS and MQTT over TLS
    on 127.0.0.1 ephemeral ports, with the security routes mounted."""
    async with running_hub(data_dir) as h:
        yield h
