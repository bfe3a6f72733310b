"""Composite types (spec 1.4): described lists whose positions are named fields.

A composite class is a frozen dataclass plus a field spec (`@composite(code, name, spec)`), which
gives it `encode_into(out)` and `from_fields(values)`. The spec names each field's AMQP type and
whether it is mandatory, in wire order, e.g. ``"name:string! handle:uint! role:bool! …"``.

Encoding writes **every** field, nulls included, and never trims trailing nulls: Azure's pyamqp
(`azure-eventhub`) reads performative fields by fixed index and fails on a shorter list.

Decoding checks each field against its type (a uint field must hold an integer in range, a symbol
field a string, …); a wrong type or a missing mandatory field is `amqp:invalid-field`. Null means the
field's default, which is the dataclass default. Fields beyond the spec are ignored, as the spec's
extension rules allow.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from .decode import decode_value
from .encode import (
    encode_binary,
    encode_bool,
    encode_map,
    encode_string,
    encode_symbol,
    encode_symbols,
    encode_timestamp,
    encode_ubyte,
    encode_uint,
    encode_ulong,
    encode_ushort,
    encode_value,
)
from .errors import INVALID_FIELD, ProtocolError
from .types import Array, Described

__all__ = [
    "Composite", "FieldCheck", "composite", "decode_composite", "from_described", "invalid", "register",
]

T = TypeVar("T", bound="Composite")
FieldCheck = Callable[[Any], Any]
Encoder = Callable[[Any, bytearray], None]
_HEAD32 = struct.Struct(">BII")


def invalid(what: str) -> ProtocolError:
    return ProtocolError(INVALID_FIELD, what, reason="invalid-field")


class Composite:
    """Base of every composite class; the class attributes are filled in by `@composite`."""

    __slots__ = ()
    DESCRIPTOR: ClassVar[int]
    NAME: ClassVar[str]
    _FIELDS: ClassVar[tuple[tuple[str, FieldCheck, bool], ...]]
    _ENCODERS: ClassVar[tuple[tuple[str, Encoder], ...]]
    _HEAD: ClassVar[bytes]
    _DEFAULTS: ClassVar[tuple[Any, ...]]
    _CHECKS: ClassVar[tuple[FieldCheck, ...]]
    _MANDATORY: ClassVar[tuple[int, ...]]

    def encode_into(self, out: bytearray) -> None:
        """Append this value: descriptor, then a list holding every field (nulls included)."""
        body = bytearray()
        for attr, encoder in self._ENCODERS:
            value = getattr(self, attr)
            if value is None:
                body.append(0x40)
            else:
                encoder(value, body)
        out += self._HEAD
        count = len(self._ENCODERS)
        size = len(body)
        if size + 1 < 256:
            out += bytes((0xC0, size + 1, count))
        else:
            out += _HEAD32.pack(0xD0, size + 4, count)
        out += body

    def encode(self) -> bytes:
        out = bytearray()
        self.encode_into(out)
        return bytes(out)

    @classmethod
    def from_fields(cls: type[T], values: list[Any]) -> T:
        """Build from a decoded field list (checked; a null or absent field takes its default)."""
        args = list(cls._DEFAULTS)
        checks = cls._CHECKS
        for index, value in enumerate(values[: len(checks)]):
            if value is not None:
                args[index] = checks[index](value)
        count = len(values)
        for index in cls._MANDATORY:
            if index >= count or values[index] is None:
                raise invalid(f"{cls.NAME}: {cls._FIELDS[index][0]} is mandatory")
        return cls(*args)


# --- field types ------------------------------------------------------------------------------------
def _int_check(low: int, high: int, kind: str) -> FieldCheck:
    def check(value: Any) -> Any:
        if type(value) is bool or not isinstance(value, int) or not low <= value <= high:
            raise invalid(f"expected {kind}, got {type(value).__name__}")
        return value

    return check


def _bool(value: Any) -> Any:
    if type(value) is not bool:
        raise invalid(f"expected boolean, got {type(value).__name__}")
    return value


def _string(value: Any) -> Any:
    if not isinstance(value, str):
        raise invalid(f"expected string, got {type(value).__name__}")
    return value


def _binary(value: Any) -> Any:
    if not isinstance(value, bytes):
        raise invalid(f"expected binary, got {type(value).__name__}")
    return value


def _symbols(value: Any) -> Any:
    """A `multiple="true"` symbol field: one symbol or an array of them → tuple of str."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Array) and all(isinstance(v, str) for v in value.items):
        return value.items
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)  # not an array, but unambiguous
    raise invalid("expected a symbol or an array of symbols")


def _map(value: Any) -> Any:
    if not isinstance(value, dict):
        raise invalid(f"expected map, got {type(value).__name__}")
    return value


def _any(value: Any) -> Any:
    return value


_COMPOSITES: dict[Any, type[Composite]] = {}


def register(*classes: type[Composite]) -> None:
    """Make `decode_composite` and the `*`-typed field checks know these classes."""
    for cls in classes:
        _COMPOSITES[cls.DESCRIPTOR] = cls
        _COMPOSITES[cls.NAME] = cls


def _described(*allowed: str) -> FieldCheck:
    """A field holding one of the composite classes registered under these names; another
    described value stays a `Described` (e.g. a transactional state the caller does not know)."""

    names = frozenset(f"amqp:{name}:list" for name in allowed)

    def check(value: Any) -> Any:
        if isinstance(value, Composite):
            return value
        if not isinstance(value, Described):
            raise invalid("expected a described value")
        cls = _COMPOSITES.get(value.descriptor)
        if cls is None:
            return value
        if cls.NAME not in names:
            raise invalid(f"{cls.NAME} is not allowed here")
        return from_described(cls, value)

    return check


def from_described(cls: type[T], value: Described) -> T:
    fields = value.value
    if not isinstance(fields, list):
        raise invalid(f"{cls.NAME} must be a list")
    return cls.from_fields(fields)


def decode_composite(buf: bytes, pos: int = 0) -> tuple[Composite | Any, int]:
    """Decode one described value at `pos`: a known composite becomes its class, anything else stays
    as decoded. Returns (value, position after it)."""
    if buf[pos: pos + 2] == b"\x00\x53" and len(buf) > pos + 3:  # the usual small-ulong descriptor
        cls = _COMPOSITES.get(buf[pos + 2])
        if cls is not None:
            fields, end = decode_value(buf, pos + 3)
            if not isinstance(fields, list):
                raise invalid(f"{cls.NAME} must be a list")
            return cls.from_fields(fields), end
    value, end = decode_value(buf, pos)
    if isinstance(value, Described):
        cls = _COMPOSITES.get(value.descriptor)
        if cls is not None:
            return from_described(cls, value), end
    return value, end


def _encode_any(value: Any, out: bytearray) -> None:
    encode_value(value, out)


def _encode_fields(value: Any, out: bytearray) -> None:
    encode_map(value, out, symbol_keys=True)


_KINDS: dict[str, tuple[FieldCheck, Encoder]] = {
    "ubyte": (_int_check(0, 0xFF, "ubyte"), encode_ubyte),
    "ushort": (_int_check(0, 0xFFFF, "ushort"), encode_ushort),
    "uint": (_int_check(0, 0xFFFF_FFFF, "uint"), encode_uint),
    "ulong": (_int_check(0, 0xFFFF_FFFF_FFFF_FFFF, "ulong"), encode_ulong),
    "bool": (_bool, encode_bool),
    "string": (_string, encode_string),
    "symbol": (_string, encode_symbol),
    "binary": (_binary, encode_binary),
    "timestamp": (_int_check(-(1 << 63), (1 << 63) - 1, "timestamp"), encode_timestamp),
    "symbols": (_symbols, encode_symbols),
    "fields": (_map, _encode_fields),
    "map": (_map, _encode_any),
    "any": (_any, _encode_any),
}


def composite(code: int, name: str, spec: str) -> Callable[[type[T]], type[T]]:
    """Attach the wire spec to a composite dataclass. `spec`: space-separated `attr:kind`, `!`
    marking a mandatory field; kind is one of `_KINDS` or `*name|name` for composite fields."""

    def apply(cls: type[T]) -> type[T]:
        fields: list[tuple[str, FieldCheck, bool]] = []
        encoders: list[tuple[str, Encoder]] = []
        for item in spec.split():
            attr, _, kind = item.partition(":")
            mandatory = kind.endswith("!")
            kind = kind.rstrip("!")
            check: FieldCheck
            encoder: Encoder
            if kind.startswith("*"):
                check, encoder = _described(*kind[1:].split("|")), _encode_any
            else:
                check, encoder = _KINDS[kind]
            fields.append((attr, check, mandatory))
            encoders.append((attr, encoder))
        defaults = {f.name: (None if f.default is dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if list(defaults) != [f[0] for f in fields]:
            raise TypeError(f"{cls.__name__}: spec and dataclass fields differ")
        cls._DEFAULTS = tuple(defaults.values())
        cls.DESCRIPTOR = code
        cls.NAME = name
        cls._FIELDS = tuple(fields)
        cls._CHECKS = tuple(f[1] for f in fields)
        cls._MANDATORY = tuple(i for i, f in enumerate(fields) if f[2])
        cls._ENCODERS = tuple(encoders)
        head = bytearray(b"\x00")
        encode_ulong(code, head)
        cls._HEAD = bytes(head)
        return cls

    return apply

