"""AMQP 1.0 values as Python objects: which Python type stands for which AMQP type.

Plain Python types stand for the AMQP types they obviously are (`None` null, `bool` boolean, `int`
long, `float` double, `str` string, `bytes` binary, `uuid.UUID` uuid, `list` list, `dict` map), so the
common case needs no wrapping. Every other AMQP type has a thin subclass that remembers its wire type
(`UInt(5)` is an int that encodes as uint, `Symbol("x")` a str that encodes as symbol), and the
decoder returns these, so a value read from the wire is written back with the same type. That matters
to clients: a CBS reply's correlation-id must carry the request's message-id with its AMQP type
(ulong for uamqp, uuid for pyamqp, string for rhea).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "AMQP_TYPES",
    "ARRAY_FAMILY",
    "Array",
    "Byte",
    "Char",
    "Decimal32",
    "Decimal64",
    "Decimal128",
    "Described",
    "Float",
    "Int",
    "Short",
    "Symbol",
    "Timestamp",
    "UByte",
    "UInt",
    "ULong",
    "UShort",
]


class _Bounded(int):
    """An int with an AMQP width: out-of-range values are refused when built."""

    LOW: int = 0
    HIGH: int = 0

    def __new__(cls, value: int = 0) -> Any:
        if not cls.LOW <= value <= cls.HIGH:
            raise ValueError(f"{cls.__name__} out of range: {value}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class UByte(_Bounded):
    LOW, HIGH = 0, 0xFF


class UShort(_Bounded):
    LOW, HIGH = 0, 0xFFFF


class UInt(_Bounded):
    LOW, HIGH = 0, 0xFFFF_FFFF


class ULong(_Bounded):
    LOW, HIGH = 0, 0xFFFF_FFFF_FFFF_FFFF


class Byte(_Bounded):
    LOW, HIGH = -0x80, 0x7F


class Short(_Bounded):
    LOW, HIGH = -0x8000, 0x7FFF


class Int(_Bounded):
    LOW, HIGH = -0x8000_0000, 0x7FFF_FFFF


class Timestamp(_Bounded):
    """Milliseconds since the Unix epoch (a signed 64-bit value on the wire)."""

    LOW, HIGH = -0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF


_FLOAT32 = struct.Struct(">f")


class Float(float):
    """32-bit IEEE 754 float (plain `float` is a double)."""

    def __new__(cls, value: float = 0.0) -> Float:
        try:
            _FLOAT32.pack(value)
        except OverflowError:
            raise ValueError(f"float out of range: {value}") from None
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Float({float(self)!r})"


class Symbol(str):
    """An ASCII symbol (names of mechanisms, conditions, descriptors, annotation keys)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Symbol({str(self)!r})"


class Char(str):
    """One Unicode code point, UTF-32 on the wire."""

    __slots__ = ()

    def __new__(cls, value: str) -> Char:
        if len(value) != 1:
            raise ValueError("char must be exactly one code point")
        return super().__new__(cls, value)


class _Opaque(bytes):
    SIZE: int = 0

    def __new__(cls, value: bytes) -> Any:
        if len(value) != cls.SIZE:
            raise ValueError(f"{cls.__name__} needs {cls.SIZE} bytes")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({bytes(self)!r})"


class Decimal32(_Opaque):
    """IEEE 754 decimal32, kept as its 4 raw bytes (nobody here computes with it)."""

    SIZE = 4


class Decimal64(_Opaque):
    SIZE = 8


class Decimal128(_Opaque):
    SIZE = 16


@dataclass(frozen=True, slots=True)
class Described:
    """A described value: `descriptor` (a ulong code or a symbol name) plus the value it describes.
    Composite types the codec knows (performatives, sections, …) decode to their own classes; this
    carries everything else (e.g. an Event Hubs selector filter)."""

    descriptor: Any
    value: Any


# Format codes of one type share a family (the widest code): arrays of uint are equal whether their
# elements were written as 0x52 or 0x70, symbols as 0xA3 or 0xB3.
ARRAY_FAMILY: Final = {
    0x41: 0x56, 0x42: 0x56, 0x56: 0x56, 0x43: 0x70, 0x52: 0x70, 0x70: 0x70, 0x44: 0x80, 0x53: 0x80,
    0x80: 0x80, 0x54: 0x71, 0x71: 0x71, 0x55: 0x81, 0x81: 0x81, 0xA0: 0xB0, 0xB0: 0xB0, 0xA1: 0xB1,
    0xB1: 0xB1, 0xA3: 0xB3, 0xB3: 0xB3, 0x45: 0xD0, 0xC0: 0xD0, 0xD0: 0xD0, 0xC1: 0xD1, 0xD1: 0xD1,
    0xE0: 0xF0, 0xF0: 0xF0,
}


@dataclass(frozen=True, slots=True, eq=False)
class Array:
    """An AMQP array: elements of one type. `code` is the element constructor's format code (e.g.
    0xA3 symbol, 0x70 uint; equality goes by type, not width); `descriptor` is set when the elements
    are described values."""

    code: int
    items: tuple[Any, ...]
    descriptor: Any = None

    @property
    def family(self) -> int:
        return ARRAY_FAMILY.get(self.code, self.code)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Array):
            return NotImplemented
        return (self.family == other.family and self.items == other.items
                and self.descriptor == other.descriptor)

    def __hash__(self) -> int:
        return hash((self.family, self.items, self.descriptor))

    def __repr__(self) -> str:
        tail = "" if self.descriptor is None else f", descriptor={self.descriptor!r}"
        return f"Array(0x{self.family:02x}, {self.items!r}{tail})"

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


AMQP_TYPES: Final = (UByte, UShort, UInt, ULong, Byte, Short, Int, Timestamp, Float, Symbol, Char,
                     Decimal32, Decimal64, Decimal128, Described, Array)
