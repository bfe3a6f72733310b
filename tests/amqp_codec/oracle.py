"""Conversions between our AMQP values and python-qpid-proton's, and a Hypothesis strategy over
every AMQP type, for checking our codec against proton's (the oracle)."""

from __future__ import annotations

import uuid
from typing import Any

import proton
from hypothesis import strategies as st

from tether.protocols.amqp import (
    Array,
    Byte,
    Char,
    Decimal32,
    Decimal64,
    Decimal128,
    Described,
    Float,
    Int,
    Short,
    Symbol,
    Timestamp,
    UByte,
    UInt,
    ULong,
    UShort,
)

_TO_PROTON: list[tuple[type, Any]] = [
    (UByte, proton.ubyte), (UShort, proton.ushort), (UInt, proton.uint), (ULong, proton.ulong),
    (Byte, proton.byte), (Short, proton.short), (Int, proton.int32), (Timestamp, proton.timestamp),
    (Float, proton.float32), (Symbol, proton.symbol), (Char, proton.char), (Decimal128, proton.decimal128),
]
_DECIMALS = [(Decimal32, proton.decimal32, 4), (Decimal64, proton.decimal64, 8)]
_FROM_PROTON = {pn: ours for ours, pn in _TO_PROTON}
_ARRAY_TYPES = {
    0xA3: proton.Data.SYMBOL, 0xB3: proton.Data.SYMBOL, 0xA1: proton.Data.STRING, 0xB1: proton.Data.STRING,
    0x70: proton.Data.UINT, 0x52: proton.Data.UINT, 0x81: proton.Data.LONG, 0x55: proton.Data.LONG,
    0xA0: proton.Data.BINARY, 0xB0: proton.Data.BINARY, 0x56: proton.Data.BOOL, 0x98: proton.Data.UUID,
    0x80: proton.Data.ULONG,
}
_ARRAY_CODES = {v: k for k, v in _ARRAY_TYPES.items()}


def to_proton(value: Any) -> Any:
    for ours, pn, _size in _DECIMALS:
        if type(value) is ours:
            return pn(int.from_bytes(value, "big"))
    for ours, pn in _TO_PROTON:
        if type(value) is ours:
            return pn(value)
    if isinstance(value, Described):
        return proton.Described(to_proton(value.descriptor), to_proton(value.value))
    if isinstance(value, Array):
        items = [to_proton(v) for v in value.items]
        return proton.Array(proton.UNDESCRIBED, _ARRAY_TYPES[value.code], *items)
    if isinstance(value, list | tuple):
        return [to_proton(v) for v in value]
    if isinstance(value, dict):
        return {to_proton(k): to_proton(v) for k, v in value.items()}
    return value


def from_proton(value: Any) -> Any:
    for ours, pn, size in _DECIMALS:
        if type(value) is pn:
            return ours(int(value).to_bytes(size, "big"))
    ours = _FROM_PROTON.get(type(value))
    if ours is not None:
        return ours(value)
    if isinstance(value, proton.Described):
        return Described(from_proton(value.descriptor), from_proton(value.value))
    if isinstance(value, proton.Array):
        return Array(_ARRAY_CODES[value.type], tuple(from_proton(v) for v in value.elements))
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [from_proton(v) for v in value]
    if isinstance(value, dict):
        return {from_proton(k): from_proton(v) for k, v in value.items()}
    return value


def proton_decode(wire: bytes) -> Any:
    data = proton.Data()
    data.decode(wire)
    return from_proton(data.get_object())


def proton_encode(value: Any) -> bytes:
    data = proton.Data()
    data.put_object(to_proton(value))
    return bytes(data.encode())


def same(a: Any, b: Any) -> bool:
    """Equality that also compares AMQP types (1 as UInt is not 1 as ULong)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    if isinstance(a, Described):
        return same(a.descriptor, b.descriptor) and same(a.value, b.value)
    if isinstance(a, Array):
        return a.items == b.items and all(same(x, y) for x, y in zip(a.items, b.items, strict=True))
    return bool(a == b)


def _bounded(kind: type) -> st.SearchStrategy[Any]:
    return st.integers(kind.LOW, kind.HIGH).map(kind)  # type: ignore[attr-defined]


ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
scalars = st.one_of(
    st.none(), st.booleans(),
    *(_bounded(k) for k in (UByte, UShort, UInt, ULong, Byte, Short, Int, Timestamp)),
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, width=32).map(Float),
    st.floats(allow_nan=False), st.text(max_size=40), st.binary(max_size=40), ascii_text.map(Symbol),
    st.characters(exclude_categories=["Cs"]).map(Char), st.uuids(),
    st.binary(min_size=4, max_size=4).map(Decimal32), st.binary(min_size=8, max_size=8).map(Decimal64),
    st.binary(min_size=16, max_size=16).map(Decimal128),
)
hashable = st.one_of(st.none(), st.booleans(), _bounded(UInt), st.integers(-1000, 1000), st.text(max_size=10),
                     ascii_text.map(Symbol), _bounded(ULong))
arrays = st.one_of(
    st.lists(ascii_text.map(Symbol), max_size=5).map(lambda v: Array(0xA3, tuple(v))),
    st.lists(st.text(max_size=300), max_size=3).map(lambda v: Array(0xA1, tuple(v))),
    st.lists(_bounded(UInt), max_size=5).map(lambda v: Array(0x70, tuple(v))),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5).map(lambda v: Array(0x81, tuple(v))),
    st.lists(st.booleans(), max_size=5).map(lambda v: Array(0x56, tuple(v))),
)
values = st.recursive(
    st.one_of(scalars, arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(hashable, children, max_size=5),
        st.builds(Described, st.one_of(_bounded(ULong), ascii_text.map(Symbol)),
                  children.filter(lambda v: not isinstance(v, Described))),  # proton folds nested ones
    ),
    max_leaves=25,
)
__all__ = ["proton_decode", "proton_encode", "same", "uuid", "values"]
