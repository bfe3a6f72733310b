"""CBS tokens expire: when `se` passes without a newer put-token for the audience, the links that
depend on it are detached with `amqp:unauthorized-access` (audited `amqp.token`); a renewal on the same
connection keeps them. Its own hub on 127.0.0.61 with no clock skew allowance."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import proton
import pytest
from amqp_helpers import AmqpHub, proton_client, put_token
from proton.utils import LinkDetached

IP = "127.0.0.61"


@pytest.fixture(scope="module")
def strict_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqpHub]:
    hub = AmqpHub(Path(tmp_path_factory.mktemp("amqp-expiry")), IP, https_port=0, sas_clock_skew_s=0)
    try:
        yield hub
    finally:
        hub.stop()


def test_expired_token_detaches_its_links_and_renewal_keeps_them(strict_hub: AmqpHub) -> None:
    hub = strict_hub
    short, renewed = hub.create_device("exp-short"), hub.create_device("exp-renewed")
    started = time.time()
    conn = proton_client(hub, mechs="ANONYMOUS")
    try:
        for device in (short, renewed):
            audience = f"{IP}/devices/{device.device_id}"
            status, _, _ = put_token(conn, hub.device_token(device, ttl=4), audience)
            assert status == 200
        short_sender = conn.create_sender("/devices/exp-short/messages/events")
        renewed_sender = conn.create_sender("/devices/exp-renewed/messages/events")
        assert short_sender.send(proton.Message(body=b"1")).remote_state == proton.Delivery.ACCEPTED
        status, _, _ = put_token(conn, hub.device_token(renewed, ttl=3600), f"{IP}/devices/exp-renewed")
        assert status == 200
        deadline = time.monotonic() + 60
        while True:  # accepted until the token's expiry, then the link is gone
            try:
                short_sender.send(proton.Message(body=b"2"), timeout=10)
            except LinkDetached as exc:
                assert "amqp:unauthorized-access" in str(exc)
                break
            assert time.monotonic() < deadline, "the link outlived its token"
            time.sleep(0.25)
        assert time.time() >= started + 3  # not before the token's expiry (4 s, whole seconds)
        assert renewed_sender.send(proton.Message(body=b"3")).remote_state == proton.Delivery.ACCEPTED
    finally:
        conn.close()
    rows = [r for r in hub.audit_rows("amqp.token", "token-expired") if r.time.timestamp() >= started - 1]
    assert len(rows) == 1 and rows[0].principal == "device:exp-short"
