"""Decoder of the AMQP 1.0 type system (spec part 1): bytes in, Python values (`types`) out.

Every format code is read: fixed-width types including the small and zero forms (`smalluint`,
`uint0`, `list0`, …), 8- and 32-bit variable (binary, string, symbol) and compound (list, map) forms,
arrays (one constructor, described or not, for all elements) and described types.

Untrusted input: any malformed byte string raises `ProtocolError(amqp:decode-error)` and nothing
else. Work is bounded by the input: a compound's element count may not exceed its byte size (every
element takes at least one byte; arrays of zero-width elements are refused above that) and nesting
stops at `MAX_DEPTH`.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any, Final

from .errors import DECODE_ERROR, ProtocolError
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

__all__ = ["MAX_DEPTH", "decode_value", "decode_values"]

MAX_DEPTH: Final = 32
"""Deepest nesting of compound and described values accepted (no client nests beyond 5)."""

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_C8 = struct.Struct(">BB")  # size, count of list8 / map8 / array8
_C32 = struct.Struct(">II")

Body = Callable[[bytes, int, int], tuple[Any, int]]
"""Decodes the bytes after a constructor: (buffer, position, depth) → (value, new position)."""


def _error(what: str) -> ProtocolError:
    return ProtocolError(DECODE_ERROR, what, reason="decode-error")


# --- fixed width ------------------------------------------------------------------------------------
def _null(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return None, pos


def _true(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return True, pos


def _false(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return False, pos


def _boolean(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    value = buf[pos]
    if value > 1:
        raise _error("boolean byte must be 0 or 1")
    return value == 1, pos + 1


def _uint0(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return UInt(0), pos


def _ulong0(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return ULong(0), pos


def _list0(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return [], pos


def _ubyte(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return UByte(buf[pos]), pos + 1


def _smalluint(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return UInt(buf[pos]), pos + 1


def _smallulong(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return ULong(buf[pos]), pos + 1


def _byte(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Byte(_I8.unpack_from(buf, pos)[0]), pos + 1


def _smallint(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Int(_I8.unpack_from(buf, pos)[0]), pos + 1


def _smalllong(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return _I8.unpack_from(buf, pos)[0], pos + 1


def _ushort(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return UShort(_U16.unpack_from(buf, pos)[0]), pos + 2


def _short(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Short(_I16.unpack_from(buf, pos)[0]), pos + 2


def _uint(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return UInt(_U32.unpack_from(buf, pos)[0]), pos + 4


def _int(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Int(_I32.unpack_from(buf, pos)[0]), pos + 4


def _float(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Float(_F32.unpack_from(buf, pos)[0]), pos + 4


def _char(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    point = _U32.unpack_from(buf, pos)[0]
    if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
        raise _error("char is not a Unicode scalar value")
    return Char(chr(point)), pos + 4


def _decimal32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Decimal32(_take(buf, pos, 4)), pos + 4


def _ulong(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return ULong(_U64.unpack_from(buf, pos)[0]), pos + 8


def _long(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return _I64.unpack_from(buf, pos)[0], pos + 8


def _double(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return _F64.unpack_from(buf, pos)[0], pos + 8


def _timestamp(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Timestamp(_I64.unpack_from(buf, pos)[0]), pos + 8


def _decimal64(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Decimal64(_take(buf, pos, 8)), pos + 8


def _decimal128(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return Decimal128(_take(buf, pos, 16)), pos + 16


def _uuid(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    return uuid.UUID(bytes=_take(buf, pos, 16)), pos + 16


def _take(buf: bytes, pos: int, size: int) -> bytes:
    end = pos + size
    if end > len(buf):
        raise _error("value runs past the end of the frame")
    return buf[pos:end]


# --- variable width ---------------------------------------------------------------------------------
def _vbin8(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    end = pos + 1 + buf[pos]
    if end > len(buf):
        raise _error("value runs past the end of the frame")
    return buf[pos + 1: end], end


def _vbin32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size = _U32.unpack_from(buf, pos)[0]
    return _take(buf, pos + 4, size), pos + 4 + size


def _str8(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    end = pos + 1 + buf[pos]
    if end > len(buf):
        raise _error("value runs past the end of the frame")
    return buf[pos + 1: end].decode("utf-8"), end


def _str32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size = _U32.unpack_from(buf, pos)[0]
    return _take(buf, pos + 4, size).decode("utf-8"), pos + 4 + size


def _sym8(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    end = pos + 1 + buf[pos]
    if end > len(buf):
        raise _error("value runs past the end of the frame")
    return Symbol(buf[pos + 1: end].decode("ascii")), end


def _sym32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size = _U32.unpack_from(buf, pos)[0]
    return Symbol(_take(buf, pos + 4, size).decode("ascii")), pos + 4 + size


# --- compound ---------------------------------------------------------------------------------------
def _items(buf: bytes, pos: int, end: int, count: int, depth: int) -> tuple[list[Any], int]:
    if depth >= MAX_DEPTH:
        raise _error("values nested too deeply")
    if end > len(buf):
        raise _error("compound value runs past the end of the frame")
    if count > end - pos:
        raise _error("more elements than bytes")
    items: list[Any] = []
    append = items.append
    for _ in range(count):
        code = buf[pos]
        body = _BODIES[code]
        if body is None:
            value, pos = _constructed(buf, pos, depth + 1)
        else:
            value, pos = body(buf, pos + 1, depth + 1)
        append(value)
    if pos != end:
        raise _error("compound size does not match its elements")
    return items, pos


def _list8(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size, count = _C8.unpack_from(buf, pos)
    if size < 1:
        raise _error("list8 size too small")
    return _items(buf, pos + 2, pos + 1 + size, count, depth)


def _list32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size, count = _C32.unpack_from(buf, pos)
    if size < 4:
        raise _error("list32 size too small")
    return _items(buf, pos + 8, pos + 4 + size, count, depth)


def _pairs(items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise _error("map has an odd number of elements")
    it = iter(items)
    try:
        return dict(zip(it, it, strict=True))
    except TypeError:
        raise _error("map key is not hashable") from None


def _map8(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size, count = _C8.unpack_from(buf, pos)
    if size < 1:
        raise _error("map8 size too small")
    items, pos = _items(buf, pos + 2, pos + 1 + size, count, depth)
    return _pairs(items), pos


def _map32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size, count = _C32.unpack_from(buf, pos)
    if size < 4:
        raise _error("map32 size too small")
    items, pos = _items(buf, pos + 8, pos + 4 + size, count, depth)
    return _pairs(items), pos


def _array(buf: bytes, pos: int, end: int, count: int, depth: int) -> tuple[Any, int]:
    if depth >= MAX_DEPTH:
        raise _error("values nested too deeply")
    if end > len(buf):
        raise _error("array runs past the end of the frame")
    if count > end - pos:
        raise _error("more array elements than bytes")
    descriptor = None
    code = buf[pos]
    pos += 1
    if code == 0x00:
        descriptor, pos = _value(buf, pos, depth + 1)
        code = buf[pos]
        pos += 1
    body = _BODIES[code]
    if body is None:
        raise _error(f"invalid array element constructor 0x{code:02x}")
    items: list[Any] = []
    append = items.append
    for _ in range(count):
        value, pos = body(buf, pos, depth + 1)
        append(value if descriptor is None else Described(descriptor, value))
    if pos != end:
        raise _error("array size does not match its elements")
    return Array(code, tuple(items), descriptor), pos


def _array8(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size, count = _C8.unpack_from(buf, pos)
    if size < 2:
        raise _error("array8 size too small")
    return _array(buf, pos + 2, pos + 1 + size, count, depth)


def _array32(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    size, count = _C32.unpack_from(buf, pos)
    if size < 5:
        raise _error("array32 size too small")
    return _array(buf, pos + 8, pos + 4 + size, count, depth)


_BODIES: list[Body | None] = [None] * 256
for _code, _fn in {
    0x40: _null, 0x41: _true, 0x42: _false, 0x56: _boolean, 0x43: _uint0, 0x44: _ulong0, 0x45: _list0,
    0x50: _ubyte, 0x51: _byte, 0x52: _smalluint, 0x53: _smallulong, 0x54: _smallint, 0x55: _smalllong,
    0x60: _ushort, 0x61: _short, 0x70: _uint, 0x71: _int, 0x72: _float, 0x73: _char, 0x74: _decimal32,
    0x80: _ulong, 0x81: _long, 0x82: _double, 0x83: _timestamp, 0x84: _decimal64, 0x94: _decimal128,
    0x98: _uuid, 0xA0: _vbin8, 0xA1: _str8, 0xA3: _sym8, 0xB0: _vbin32, 0xB1: _str32, 0xB3: _sym32,
    0xC0: _list8, 0xC1: _map8, 0xD0: _list32, 0xD1: _map32, 0xE0: _array8, 0xF0: _array32,
}.items():
    _BODIES[_code] = _fn

def _constructed(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """A value whose constructor is not a plain format code: a described value (0x00)."""
    code = buf[pos]
    if code != 0x00:
        raise _error(f"unknown format code 0x{code:02x}")
    if depth >= MAX_DEPTH:
        raise _error("values nested too deeply")
    descriptor, pos = _value(buf, pos + 1, depth + 1)
    if type(descriptor) is not ULong and type(descriptor) is not Symbol:
        raise _error("descriptor must be a ulong or a symbol")
    value, pos = _value(buf, pos, depth + 1)
    return Described(descriptor, value), pos


def _value(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    body = _BODIES[buf[pos]]
    if body is None:
        return _constructed(buf, pos, depth)
    return body(buf, pos + 1, depth)


def decode_value(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode one value at `pos`; returns (value, position after it). Raises `ProtocolError`
    (amqp:decode-error) for anything malformed or truncated."""
    try:
        return _value(buf, pos, 0)
    except ProtocolError:
        raise
    except (IndexError, struct.error):
        raise _error("value runs past the end of the frame") from None
    except UnicodeDecodeError:
        raise _error("string or symbol is not valid UTF-8 / ASCII") from None


def decode_values(buf: bytes, pos: int = 0) -> list[Any]:
    """Decode consecutive values up to the end of `buf` (message sections, tests)."""
    values = []
    end = len(buf)
    while pos < end:
        value, pos = decode_value(buf, pos)
        values.append(value)
    return values
