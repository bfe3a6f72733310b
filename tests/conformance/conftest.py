"""Conformance fixtures (the hub itself: conformance_kit.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conformance_kit import AzureHub, azure_hub_with_storage


@pytest.fixture(scope="session")
def azure_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureHub]:
    """The shared hub on 127.0.0.80, with its Azurite (one per session) for file upload and jobs."""
    hub = azure_hub_with_storage(tmp_path_factory.mktemp("conformance-hub"))
    saved = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(hub.root_ca)  # azure-iot-hub (requests) trusts the dev root
    try:
        yield hub
    finally:
        if saved is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = saved
        hub.close()


@pytest.fixture
def rest(azure_hub: AzureHub) -> Iterator[httpx.Client]:
    with azure_hub.rest() as client:
        yield client
