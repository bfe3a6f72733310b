"""What the composition root does with settings and at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.config import ConfigError, Settings, load_settings
from tether.errors import QuotaExceeded
from tether.hub import Hub
from tether.registry.models import ConnectionState, utcnow
from tether.storage.base import ActivityUpdate


def _settings(tmp_path: Path, **sections: object) -> Settings:
    return load_settings(hub={"hostname": "localhost", "data_dir": tmp_path}, **sections)


async def test_a_restarted_single_gateway_shows_no_device_connected(tmp_path: Path) -> None:
    """After a crash the last activity flush may have left devices Connected; a single gateway that
    starts holds no connection, so it resets them."""
    async with Hub(_settings(tmp_path)) as hub:
        await hub.registry.create("left-over", {"deviceId": "left-over"}, actor="test")
        await hub.storage.devices.apply_activity(
            [ActivityUpdate("left-over", ConnectionState.connected, utcnow())])
        device = await hub.registry.get("left-over")
        assert device.connection_state is ConnectionState.connected
    async with Hub(_settings(tmp_path)) as hub:
        device = await hub.registry.get("left-over")
        assert device.connection_state is ConnectionState.disconnected


async def test_c2d_limits_come_from_the_settings(tmp_path: Path) -> None:
    settings = _settings(tmp_path, c2d={"max_queue_depth": 2, "max_delivery_count": 3})
    async with Hub(settings) as hub:
        await hub.registry.create("queued", {"deviceId": "queued"}, actor="test")
        for i in range(2):
            await hub.c2d.send("queued", b"m%d" % i, message_id=f"m{i}", correlation_id=None, ack="none",
                               ttl_s=None, properties={}, actor="test")
        with pytest.raises(QuotaExceeded) as refused:
            await hub.c2d.send("queued", b"over", message_id="m2", correlation_id=None, ack="none",
                               ttl_s=None, properties={}, actor="test")
        assert refused.value.code == "DeviceMaximumQueueDepthExceeded"


@pytest.mark.parametrize(("key", "value"), [("max_delivery_count", 0), ("max_delivery_count", 101),
                                             ("default_ttl_s", 172_801)])
def test_c2d_limits_are_validated(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"c2d\.{key}"):
        load_settings(c2d={key: value})
