"""Direct-method fixtures: one hub per module (plain MQTT and HTTP on 127.0.0.1 ephemeral ports), a
REST client with the owner policy, and a factory of paho devices closed after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from methods_helpers import METHODS_FILTER, DeviceFactory, HubHarness, PahoDevice


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubHarness]:
    h = HubHarness(Path(tmp_path_factory.mktemp("methods-hub")))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def rest(harness: HubHarness) -> Iterator[httpx.Client]:
    with harness.rest() as client:
        yield client


@pytest.fixture
def device(harness: HubHarness) -> Iterator[DeviceFactory]:
    """`device(id, subscribe=True, responder=None, create=True)`: a connected paho device."""
    opened: list[PahoDevice] = []

    def make(device_id: str, *, subscribe: bool = True, responder: Any = None,
             create: bool = True) -> PahoDevice:
        identity = harness.create_device(device_id) if create else harness.call(
            harness.hub.registry.get(device_id))
        dev = PahoDevice(harness, identity)
        dev.responder = responder
        opened.append(dev)
        dev.connect()
        if subscribe:
            dev.subscribe(METHODS_FILTER)
            # the session reports the subscription to the hooks right after its SUBACK
            harness.wait(lambda: harness.methods.online(device_id) is not None, what="method subscription")
        return dev

    try:
        yield make
    finally:
        for dev in opened:
            dev.close()
