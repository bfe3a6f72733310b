"""Our codec against python-qpid-proton's: proton decodes what we encode, we decode what proton
encodes, and both round trips keep every value and its AMQP type (Hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings

from tether.protocols.amqp import decode_value, encode_values

from .oracle import proton_decode, proton_encode, same, values

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(values)
def test_our_encoding_round_trips_through_our_decoder(value: Any) -> None:
    wire = encode_values(value)
    decoded, end = decode_value(wire)
    assert end == len(wire)
    assert same(decoded, value), (decoded, value)


@SETTINGS
@given(values)
def test_proton_decodes_what_we_encode(value: Any) -> None:
    assert same(proton_decode(encode_values(value)), value)


@SETTINGS
@given(values)
def test_we_decode_what_proton_encodes(value: Any) -> None:
    wire = proton_encode(value)
    decoded, end = decode_value(wire)
    assert end == len(wire)
    assert same(decoded, value), (decoded, value)
