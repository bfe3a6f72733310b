"""CLI test fixtures: `cli(...)` runs `tether --data-dir {tmp}/data …` in-process with CliRunner, with
every TETHER_* variable cleared (and restored afterwards) so tests never see the caller's settings."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from tether.cli.main import app


class Cli:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.runner = CliRunner()

    def __call__(
        self,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        ok: bool = True,
        data_dir: bool = True,
        input: str | None = None,
    ) -> Result:
        clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TETHER_")}
        clean.update({"TETHER_CONFIG": None, "TETHER_HUB_URL": None, "TETHER_CONNECTION_STRING": None,
                      "TETHER_CA_FILE": None})
        clean.update(env or {})
        argv = (["--data-dir", str(self.data_dir)] if data_dir else []) + list(args)
        result = self.runner.invoke(app, argv, env=clean, input=input)
        if ok:
            assert result.exit_code == 0, (
                f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"exception: {result.exception!r}"
            )
        return result


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


@pytest.fixture
def owner_cs(cli: Cli) -> str:
    """An initialised data dir; returns the iothubowner connection string `init` printed."""
    return cli("init").stdout.strip()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
