"""Encoder of the AMQP 1.0 type system: Python values (`types`) in, bytes out.

The smallest form is chosen for every value (`uint0`, `smalluint`, `str8`, `list0`, `list8`, …), which
is what the spec recommends and every client decodes. Plain Python values map to the obvious AMQP type
(`int` → long, `float` → double, `str` → string, `bytes` → binary, `list`/`tuple` → list, `dict` →
map, `uuid.UUID` → uuid, `datetime` → timestamp); the `types` wrappers pick any other type.

Values our own code builds are trusted to be encodable; a value that is not (an int beyond 64 bits, an
unsupported Python type) raises `TypeError`/`ValueError`: that is a bug, not peer input.
"""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from collections.abc import Callable
from typing import Any

from .types import (
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

__all__ = [
    "encode_binary",
    "encode_bool",
    "encode_map",
    "encode_string",
    "encode_symbol",
    "encode_symbols",
    "encode_timestamp",
    "encode_ubyte",
    "encode_uint",
    "encode_ulong",
    "encode_ushort",
    "encode_value",
    "encode_values",
]

Out = bytearray
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_B_U32 = struct.Struct(">BI")
_B_U64 = struct.Struct(">BQ")
_B_I32 = struct.Struct(">Bi")
_B_I64 = struct.Struct(">Bq")
_B_U16 = struct.Struct(">BH")
_HEAD8 = struct.Struct(">BBB")  # code, size, count
_HEAD32 = struct.Struct(">BII")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --- scalars ----------------------------------------------------------------------------------------
def encode_bool(value: bool, out: Out) -> None:
    out.append(0x41 if value else 0x42)


def encode_ubyte(value: int, out: Out) -> None:
    out += bytes((0x50, value))


def encode_ushort(value: int, out: Out) -> None:
    out += _B_U16.pack(0x60, value)


def encode_uint(value: int, out: Out) -> None:
    if value == 0:
        out.append(0x43)
    elif value < 256:
        out += bytes((0x52, value))
    else:
        out += _B_U32.pack(0x70, value)


def encode_ulong(value: int, out: Out) -> None:
    if value == 0:
        out.append(0x44)
    elif value < 256:
        out += bytes((0x53, value))
    else:
        out += _B_U64.pack(0x80, value)


def _encode_byte(value: int, out: Out) -> None:
    out.append(0x51)
    out += _I8.pack(value)


def _encode_short(value: int, out: Out) -> None:
    out.append(0x61)
    out += _I16.pack(value)


def _encode_int(value: int, out: Out) -> None:
    if -128 <= value <= 127:
        out.append(0x54)
        out += _I8.pack(value)
    else:
        out += _B_I32.pack(0x71, value)


def _encode_long(value: int, out: Out) -> None:
    if -128 <= value <= 127:
        out.append(0x55)
        out += _I8.pack(value)
    else:
        out += _B_I64.pack(0x81, value)


def encode_timestamp(value: int, out: Out) -> None:
    out += _B_I64.pack(0x83, value)


def _encode_datetime(value: dt.datetime, out: Out) -> None:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    millis = (value - _EPOCH) // dt.timedelta(milliseconds=1)
    encode_timestamp(millis, out)


def _encode_float(value: float, out: Out) -> None:
    out.append(0x72)
    out += _F32.pack(value)


def _encode_double(value: float, out: Out) -> None:
    out.append(0x82)
    out += _F64.pack(value)


def _encode_char(value: str, out: Out) -> None:
    out.append(0x73)
    out += _U32.pack(ord(value))


def _encode_decimal(code: int) -> Callable[[bytes, Out], None]:
    def encode(value: bytes, out: Out) -> None:
        out.append(code)
        out += value

    return encode


def _encode_uuid(value: uuid.UUID, out: Out) -> None:
    out.append(0x98)
    out += value.bytes


# --- variable width ---------------------------------------------------------------------------------
def _variable(small: int, large: int, raw: bytes, out: Out) -> None:
    size = len(raw)
    if size < 256:
        out += bytes((small, size))
    else:
        out += _B_U32.pack(large, size)
    out += raw


def encode_binary(value: bytes, out: Out) -> None:
    _variable(0xA0, 0xB0, value, out)


def encode_string(value: str, out: Out) -> None:
    _variable(0xA1, 0xB1, value.encode("utf-8"), out)


def encode_symbol(value: str, out: Out) -> None:
    _variable(0xA3, 0xB3, value.encode("ascii"), out)


# --- compound ---------------------------------------------------------------------------------------
def _compound(codes: tuple[int, int, int], count: int, body: bytes | bytearray, out: Out) -> None:
    """list/map header (zero, 8-bit or 32-bit form) then the encoded elements."""
    zero, small, large = codes
    if count == 0 and zero:
        out.append(zero)
        return
    size = len(body)
    if size + 1 < 256 and count < 256:
        out += _HEAD8.pack(small, size + 1, count)
    else:
        out += _HEAD32.pack(large, size + 4, count)
    out += body


_LIST = (0x45, 0xC0, 0xD0)
_MAP = (0, 0xC1, 0xD1)


def _encode_list(value: list[Any] | tuple[Any, ...], out: Out) -> None:
    body = bytearray()
    for item in value:
        encode_value(item, body)
    _compound(_LIST, len(value), body, out)


def encode_map(value: dict[Any, Any], out: Out, *, symbol_keys: bool = False) -> None:
    """A map; with `symbol_keys`, str keys are written as symbols (annotations, `fields`)."""
    body = bytearray()
    for key, item in value.items():
        if symbol_keys and type(key) is str:
            encode_symbol(key, body)
        else:
            encode_value(key, body)
        encode_value(item, body)
    _compound(_MAP, 2 * len(value), body, out)


def _encode_dict(value: dict[Any, Any], out: Out) -> None:
    encode_map(value, out)


def _encode_described(value: Described, out: Out) -> None:
    out.append(0x00)
    encode_value(value.descriptor, out)
    encode_value(value.value, out)


# --- arrays -----------------------------------------------------------------------------------------
# Arrays share one constructor, so the widest form of the type family is used (the variable-width
# ones drop to their 8-bit form when every element fits).
_FIXED = {
    0x50: (struct.Struct(">B"), int), 0x51: (_I8, int), 0x60: (_U16, int), 0x61: (_I16, int),
    0x70: (_U32, int), 0x71: (_I32, int),
    0x72: (_F32, float), 0x80: (_U64, int), 0x81: (_I64, int), 0x82: (_F64, float), 0x83: (_I64, int),
}


def _array_element(code: int, value: Any, out: Out) -> None:
    """One array element without its constructor."""
    if code == 0x56:
        out.append(1 if value else 0)
    elif code in (0xB0, 0xB1, 0xB3, 0xA0, 0xA1, 0xA3):
        raw = value if code in (0xB0, 0xA0) else value.encode("utf-8" if code in (0xB1, 0xA1) else "ascii")
        out += (bytes((len(raw),)) if code < 0xB0 else _U32.pack(len(raw))) + raw
    elif code == 0x73:
        out += _U32.pack(ord(value))
    elif code in (0x74, 0x84, 0x94):
        out += value
    elif code == 0x98:
        out += value.bytes
    elif code in (0xD0, 0xD1):
        body = bytearray()
        if code == 0xD0:
            for item in value:
                encode_value(item, body)
            count = len(value)
        else:
            for key, item in value.items():
                encode_value(key, body)
                encode_value(item, body)
            count = 2 * len(value)
        out += _U32.pack(len(body) + 4) + _U32.pack(count) + body
    elif code == 0xF0:
        inner = bytearray()
        _array_body(value, inner, wide=True)
        out += inner[1:]  # drop the 0xF0 constructor: array elements carry none
    elif code == 0x40:
        pass
    else:
        packer, convert = _FIXED[code]
        out += packer.pack(convert(value))


def _array_body(value: Array, out: Out, *, wide: bool = False) -> None:
    code = value.family
    items = [v.value if isinstance(v, Described) else v for v in value.items]
    if code == 0xB3 and all(len(v) < 256 for v in items):
        code = 0xA3
    elif code in (0xB0, 0xB1) and all(len(v.encode() if isinstance(v, str) else v) < 256 for v in items):
        code -= 0x10
    constructor = bytearray()
    if value.descriptor is not None:
        constructor.append(0x00)
        encode_value(value.descriptor, constructor)
    constructor.append(code)
    body = bytearray()
    for item in items:
        _array_element(code, item, body)
    count = len(items)
    size = len(constructor) + len(body)
    if size + 1 < 256 and count < 256 and not wide:
        out += _HEAD8.pack(0xE0, size + 1, count)
    else:
        out += _HEAD32.pack(0xF0, size + 4, count)
    out += constructor
    out += body


def encode_symbols(values: tuple[str, ...] | list[str], out: Out) -> None:
    """A multiple-symbol field: an array of symbols."""
    _array_body(Array(0xA3, tuple(values)), out)


# --- dispatch ---------------------------------------------------------------------------------------
def _encode_none(value: None, out: Out) -> None:
    out.append(0x40)


_ENCODERS: dict[type, Callable[[Any, Out], None]] = {
    type(None): _encode_none,
    bool: encode_bool,
    int: _encode_long,
    float: _encode_double,
    str: encode_string,
    bytes: encode_binary,
    bytearray: encode_binary,
    list: _encode_list,
    tuple: _encode_list,
    dict: _encode_dict,
    uuid.UUID: _encode_uuid,
    dt.datetime: _encode_datetime,
    UByte: encode_ubyte,
    UShort: encode_ushort,
    UInt: encode_uint,
    ULong: encode_ulong,
    Byte: _encode_byte,
    Short: _encode_short,
    Int: _encode_int,
    Timestamp: encode_timestamp,
    Float: _encode_float,
    Symbol: encode_symbol,
    Char: _encode_char,
    Decimal32: _encode_decimal(0x74),
    Decimal64: _encode_decimal(0x84),
    Decimal128: _encode_decimal(0x94),
    Described: _encode_described,
    Array: _array_body,
}


def encode_value(value: Any, out: Out) -> None:
    """Append the encoding of `value` to `out`."""
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        encoder = _fallback(value)
    encoder(value, out)


def _fallback(value: Any) -> Callable[[Any, Out], None]:
    """Subclasses of the supported types (an IntEnum, a str subclass, …) and composite classes that
    know their own encoding (`encode_into`)."""
    own = getattr(value, "encode_into", None)
    if own is not None:
        return lambda v, out: v.encode_into(out)
    for kind in type(value).__mro__[1:]:
        encoder = _ENCODERS.get(kind)
        if encoder is not None:
            return encoder
    raise TypeError(f"cannot encode {type(value).__name__} as AMQP")


def encode_values(*values: Any) -> bytes:
    """The encodings of `values`, concatenated."""
    out = bytearray()
    for value in values:
        encode_value(value, out)
    return bytes(out)
