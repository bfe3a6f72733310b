"""`served`: a hub with every listener as `tether run` starts them, on 127.0.0.90 (see helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hardening.helpers import Served, serving


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(tmp_path / "hub") as s:
        yield s
