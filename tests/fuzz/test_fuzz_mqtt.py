"""Fuzz harnesses for the MQTT codec and Azure topic rules (registered in `tests/fuzz/run.py`).

Invariants: hostile bytes only ever raise ProtocolError and never leave more than
`max_packet_size` bytes buffered; every decoded packet re-encodes to itself; hostile text only ever
raises TopicError; an accepted publish or subscribe never names another identity.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from tether.protocols.mqtt import (
    NEED_DATA,
    ConnAck,
    Connect,
    Disconnect,
    MqttConnection,
    Packet,
    PingReq,
    PingResp,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode_packet,
)
from tether.protocols.mqtt.topics import (
    MethodResponse,
    Telemetry,
    TopicError,
    TwinGet,
    TwinReportedPatch,
    classify_publish,
    classify_subscribe,
    encode_property_bag,
    parse_property_bag,
    parse_username,
)

from .harness import Harness, corpus, fuzz_examples

SEEDS = corpus("mqtt")
CONNECT = encode_packet(Connect("dev1", "localhost/dev1/?api-version=2021-04-12", b"token"))
CLIENT_PACKETS = (
    Connect,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    Unsubscribe,
    PingReq,
    Disconnect,
)

# --------------------------------------------------------------------------- packet strategies

text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
topic_names = text.filter(lambda t: t != "" and "+" not in t and "#" not in t)
level = st.one_of(
    st.just("+"), st.just(""), st.text(st.characters(codec="utf-8", exclude_characters="\x00/+#"))
)
topic_filters = st.builds(
    lambda levels, hash_tail: "/".join(levels + (["#"] if hash_tail else [])),
    st.lists(level, min_size=1, max_size=5),
    st.booleans(),
).filter(bool)
packet_ids = st.integers(1, 0xFFFF)
qos = st.integers(0, 2)
binary = st.binary(max_size=300)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    level = draw(qos)
    return Publish(
        draw(topic_names),
        draw(binary),
        level,
        draw(st.booleans()),
        draw(st.booleans()) if level else False,
        draw(packet_ids) if level else None,
    )


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    clean = draw(st.booleans())
    client_id = draw(text if clean else text.filter(bool))
    username = draw(st.none() | text)
    password = draw(st.none() | binary) if username is not None else None
    will = draw(st.none() | st.builds(Will, topic_names, binary, qos, st.booleans()))
    return Connect(client_id, username, password, draw(st.integers(0, 0xFFFF)), clean, will)


after_connect = st.one_of(
    publishes(),
    st.builds(PubAck, packet_ids),
    st.builds(PubRec, packet_ids),
    st.builds(PubRel, packet_ids),
    st.builds(PubComp, packet_ids),
    st.builds(
        Subscribe, packet_ids, st.lists(st.tuples(topic_filters, qos), min_size=1, max_size=4).map(tuple)
    ),
    st.builds(Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=4).map(tuple)),
    st.just(PingReq()),
    st.just(Disconnect()),
)
client_packets = connects() | after_connect
server_packets = st.one_of(
    st.builds(ConnAck, st.just(True), st.just(0)) | st.builds(ConnAck, st.just(False), st.integers(0, 5)),
    publishes(),
    st.builds(PubAck, packet_ids),
    st.builds(
        SubAck, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=4).map(tuple)
    ),
    st.builds(UnsubAck, packet_ids),
    st.just(PingResp()),
)


def decode_one(data: bytes, role: str) -> Packet:
    """Decode one encoded packet with a connection already past its handshake."""
    conn = MqttConnection("server" if role == "server" else "client", max_packet_size=1 << 20)
    if not data.startswith(b"\x10" if role == "server" else b"\x20"):
        conn.receive_data(CONNECT if role == "server" else b"\x20\x02\x00\x00")
        conn.next_event()
    conn.receive_data(data)
    event = conn.next_event()
    assert event is not NEED_DATA
    assert conn.next_event() is NEED_DATA and conn.buffered_bytes == 0
    return event


def check_round_trip(case: tuple[str, Packet]) -> None:
    role, packet = case
    assert decode_one(encode_packet(packet), role) == packet


# --------------------------------------------------------------------------- byte streams


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([seed for _, seed in SEEDS])))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


streams = st.tuples(
    st.sampled_from([b"", CONNECT, CONNECT, CONNECT]),
    st.one_of(
        st.binary(max_size=400),
        mutated_seed(),
        st.lists(after_connect.map(encode_packet), max_size=6).map(b"".join),
        st.lists(st.one_of(mutated_seed(), client_packets.map(encode_packet)), max_size=4).map(b"".join),
    ),
    st.sampled_from([8, 64, 300, 4096, 4096, 4096]),
    st.lists(st.integers(1, 97), min_size=1, max_size=8),
).map(lambda t: (t[0] + t[1], t[2], t[3]))


def check_stream(case: tuple[bytes, int, list[int]]) -> None:
    data, max_size, chunks = case
    conn = MqttConnection("server", max_packet_size=max_size)
    pos = turn = 0
    while pos < len(data):
        step = chunks[turn % len(chunks)]
        conn.receive_data(data[pos : pos + step])
        pos, turn = pos + step, turn + 1
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                assert type(event) in CLIENT_PACKETS
                assert decode_one(encode_packet(event), "server") == event
        except ProtocolError as exc:
            assert exc.connack_code in (None, 1, 2)
            assert conn.buffered_bytes == 0
            try:
                conn.next_event()
            except ProtocolError as again:
                assert again is exc
            else:
                raise AssertionError("a broken connection must stay broken") from None
            return
        assert conn.buffered_bytes < max_size


# --------------------------------------------------------------------------- topics

ids = st.text(st.sampled_from("ab1-.%_*?!(),:=@$'+#/&"), min_size=1, max_size=6)
principals = st.tuples(ids.filter(lambda s: "/" not in s), st.none() | ids.filter(lambda s: "/" not in s))
bag_text = st.lists(
    st.tuples(st.sampled_from(["", "$.", "%24.", "%", "%2", "%zz", "%C3%A9", "a", "&", "=", "+"]), text),
    max_size=6,
).map(lambda parts: "".join(a + b for a, b in parts))


@st.composite
def publish_topics(draw: st.DrawFn) -> tuple[str, str, str | None]:
    device, module = draw(principals)
    other = draw(ids)
    base = draw(
        st.sampled_from(
            [
                f"devices/{device}/messages/events/",
                f"devices/{device}/messages/events",
                f"devices/{device}/modules/{module}/messages/events/",
                f"devices/{other}/messages/events/",
                f"devices/{device}/modules/{other}/messages/events/",
                f"devices/{device}/messages/devicebound/",
                "$iothub/twin/GET/?",
                "$iothub/twin/PATCH/properties/reported/?",
                "$iothub/methods/res/",
                "",
            ]
        )
    )
    return base + draw(bag_text | text), device, module


def check_classify(case: tuple[str, str, str | None]) -> None:
    topic, device, module = case
    try:
        target = classify_publish(topic, device, module)
    except TopicError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    if isinstance(target, Telemetry):
        own = f"devices/{device}/modules/{module}/" if module else f"devices/{device}/messages/"
        assert topic.startswith(own)
        assert all(key.startswith("$.") for key in target.system_properties)
    else:
        assert isinstance(target, TwinGet | TwinReportedPatch | MethodResponse)
        assert topic.startswith("$iothub/") and target.rid


def check_subscribe(case: tuple[str, str, str | None]) -> None:
    topic_filter, device, module = case
    kind = classify_subscribe(topic_filter, device, module)
    if kind in ("c2d", "inputs"):
        assert topic_filter.startswith((f"devices/{device}/", "devices/+/messages/devicebound/"))
    elif kind is not None:
        assert topic_filter.startswith("$iothub/")


def check_bag(bag: str) -> None:
    try:
        system, app = parse_property_bag(bag)
    except TopicError:
        return
    assert all(k.startswith("$.") for k in system) and not any(k.startswith("$.") for k in app)
    assert len(system) + len(app) <= 100


def check_bag_round_trip(case: tuple[dict[str, str], dict[str, str]]) -> None:
    system, app = case
    assert parse_property_bag(encode_property_bag(system, app)) == (system, app)


def check_username(username: str) -> None:
    try:
        parsed = parse_username(username)
    except TopicError:
        return
    assert parsed.hostname and parsed.device_id and parsed.module_id != ""
    assert "/" not in parsed.device_id


usernames = st.one_of(
    text,
    st.builds(
        lambda host, dev, mod, q: f"{host}/{dev}/{mod + '/' if mod else ''}?{q}",
        ids,
        ids,
        st.none() | ids,
        bag_text,
    ),
)
bag_keys = text.filter(lambda k: k != "" and not k.startswith("$."))

HARNESSES = [
    Harness(
        "mqtt.stream",
        streams,
        check_stream,
        seeds=[(CONNECT + seed if not seed.startswith(b"\x10") else seed, 4096, [7]) for _, seed in SEEDS],
    ),
    Harness(
        "mqtt.roundtrip",
        st.tuples(st.just("server"), client_packets) | st.tuples(st.just("client"), server_packets),
        check_round_trip,
    ),
    Harness("topics.property_bag", bag_text | text, check_bag),
    Harness(
        "topics.property_bag_roundtrip",
        st.tuples(
            st.dictionaries(bag_keys.map(lambda k: "$." + k), text, max_size=5),
            st.dictionaries(bag_keys, text, max_size=5),
        ),
        check_bag_round_trip,
    ),
    Harness("topics.username", usernames, check_username),
    Harness("topics.classify_publish", publish_topics() | st.tuples(text, ids, st.none()), check_classify),
    Harness(
        "topics.classify_subscribe",
        st.tuples(
            st.sampled_from(
                ["devices/{d}/messages/devicebound/#", "devices/+/messages/devicebound/+", "$iothub/"]
            )
            | text,
            ids,
            st.none() | ids,
        ).map(lambda t: (t[0].replace("{d}", t[1]), t[1], t[2])),
        check_subscribe,
    ),
]


@pytest.mark.parametrize("harness", HARNESSES, ids=[h.name for h in HARNESSES])
def test_harness_never_crashes(harness: Harness) -> None:
    assert harness.run(fuzz_examples()) >= len(harness.seeds)


def test_corpus_is_present() -> None:
    assert {name for name, _ in SEEDS} >= {"connect_azure_sdk.bin", "publish_telemetry_qos1.bin"}
