"""Console browser test fixtures (helpers in console_helpers.py): the hub on 127.0.0.102 and the
browser (Debian's chromium through Playwright, installed with apt-get when missing)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from console_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, ConsoleHub, ensure_chromium


@pytest.fixture(scope="module")
def console_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleHub]:
    hub = ConsoleHub(tmp_path_factory.mktemp("console-hub"))
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()
