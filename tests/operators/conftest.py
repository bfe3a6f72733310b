"""Operator tests: a real hub (SQLite) serving its REST app and console on 127.0.0.100 (this area's
loopback addresses are 127.0.0.100-109), and a test OIDC issuer on 127.0.0.101."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from operator_helpers import OperatorEnv, operator_env


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[..., Any]:
    """`async with make_env(**operator_settings) as env:` — hub + issuer + HTTP client."""

    def make(**operators: Any) -> Any:
        return operator_env(tmp_path, **operators)

    return make


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[OperatorEnv]:
    async with operator_env(tmp_path) as e:
        yield e
