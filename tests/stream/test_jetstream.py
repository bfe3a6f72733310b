"""JetStream specifics: one stream per partition with the configured limits, expired events skipped."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

import nats
import pytest

from tether.storage.stream.jetstream import JetStreamEventStream

from .conftest import NATS_URL, nats_unreachable

NO_PROPS: dict[str, str] = {}


@pytest.fixture
async def names() -> AsyncIterator[tuple[str, str]]:
    reason = nats_unreachable()
    if reason:
        pytest.skip(reason)
    suffix = secrets.token_hex(4)
    pair = (f"TSTJ_{suffix.upper()}", f"tstj_cp_{suffix}")
    yield pair
    cleaner = JetStreamEventStream(NATS_URL, 2, 1.0, 1 << 20, stream_name=pair[0], kv_bucket=pair[1])
    await cleaner.start()
    await cleaner.delete_storage()
    await cleaner.close()


async def test_one_file_stream_per_partition_with_the_retention_limits(names: tuple[str, str]) -> None:
    s = JetStreamEventStream(NATS_URL, 2, 2.0, 4 << 20, stream_name=names[0], kv_bucket=names[1])
    await s.start()
    await s.close()
    s = JetStreamEventStream(NATS_URL, 2, 3.0, 8 << 20, stream_name=names[0], kv_bucket=names[1])
    await s.start()  # changed limits are applied to the existing streams
    await s.close()
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for p in range(2):
            info = await js.stream_info(f"{names[0]}_P{p}")
            assert info.config.subjects == [f"{names[0].lower().replace('_', '.')}.p{p}"]
            assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"
            assert info.config.max_bytes == 8 << 20
            assert info.config.max_age == pytest.approx(3 * 3600)
    finally:
        await nc.close()


async def test_read_from_an_expired_sequence_starts_at_the_earliest_kept(names: tuple[str, str]) -> None:
    s = JetStreamEventStream(NATS_URL, 1, 1.0, 4096, stream_name=names[0], kv_bucket=names[1])
    await s.start()
    try:
        for i in range(40):
            await s.append("dev", b"%03d" % i * 40, properties=NO_PROPS, system_properties=NO_PROPS)
        got = await s.read(0, from_sequence=0, max_count=100)
        assert 0 < got[0].sequence_number and got[-1].sequence_number == 39
        assert [e.sequence_number for e in got] == list(range(got[0].sequence_number, 40))
        assert await s.latest_sequence(0) == 40
    finally:
        await s.close()


async def test_unreachable_nats_is_a_clear_stream_error() -> None:
    from tether.messaging.events import StreamError

    s = JetStreamEventStream("nats://user:secret@127.0.0.1:1", 1, 1.0, 1 << 20, request_timeout_s=0.5,
                             connect_deadline_s=1.5)
    started = time.monotonic()
    with pytest.raises(StreamError, match="cannot reach NATS") as info:
        await s.start()
    assert time.monotonic() - started < 5
    assert "secret" not in str(info.value)
