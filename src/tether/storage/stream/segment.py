"""On-disk format of the embedded event log: segment files of CRC-framed records (no I/O scheduling here).

A partition is a directory of segments named by their first sequence number (`00000000000000001234.seg`).
Segment = 40-byte header (magic, first sequence, base byte offset, creation time, CRC) then records:

    frame   <I length of payload> <I crc32(length bytes + payload)>
    payload <Q sequence> <Q enqueued ms> <H device len> <H module len, 0xFFFF = none>
            <I system-properties len> <I properties len> <I body len>
            device id (UTF-8) | module id | system properties JSON | properties JSON | body

An event's `offset` is `base_offset + position in the file`: a byte position in the partition's whole log,
as Event Hubs has it. Everything here is synchronous; callers run scans in a worker thread.
"""

from __future__ import annotations

import json
import json.encoder
import os
import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from tether.storage.stream.base import RawEvent, StreamError

SEGMENT_SUFFIX = ".seg"
HEADER = struct.Struct("<8sQQQI4x")
HEADER_SIZE = HEADER.size  # 40
MAGIC = b"TTHRSEG1"
FRAME = struct.Struct("<II")
PAYLOAD = struct.Struct("<QQHHIII")
_SEQ_TIME = struct.Struct("<QQ")  # PAYLOAD = _SEQ_TIME + _LENS
_LENS = struct.Struct("<HHIII")
NO_MODULE = 0xFFFF
MAX_RECORD = 16 << 20  # a length above this is corruption, not a record
INDEX_EVERY_RECORDS = 32
INDEX_EVERY_BYTES = 128 << 10
READ_CHUNK = 256 << 10


class Record(NamedTuple):
    position: int  # in the segment file
    sequence: int
    enqueued_ms: int
    device_id: str
    module_id: str | None
    system_properties: dict[str, str]
    properties: dict[str, str]
    body: bytes


# One shared encoder: json.dumps() with options builds a new one per call (measured: 2x slower appends).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# The C encoder behind it, made once: `JSONEncoder.encode` builds one per call (~1 µs per dict).
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE: Callable[[object, int], list[str]] | None = None
if _c_make_encoder is not None:  # (markers, default, encoder, indent, separators, sort, skip, allow_nan)
    _C_ENCODE = _c_make_encoder(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",",
                                False, False, True)


def _json_props(props: Mapping[str, str]) -> bytes:
    """The stored JSON of a property dict (`EncodedProperties` must match it byte for byte)."""
    if not props:
        return b""
    if _C_ENCODE is not None and type(props) is dict:
        return "".join(_C_ENCODE(props, 0)).encode("utf-8")
    return _ENCODER.encode(props).encode("utf-8")


class PreparedEvent(NamedTuple):
    """What `append` pre-encodes on the caller's turn; the writer only adds sequence and time.
    (A NamedTuple: a frozen dataclass spends ~1 µs per event in `object.__setattr__`.)"""

    device_id: str
    module_id: str | None
    system_properties: dict[str, str]
    properties: dict[str, str]
    body: bytes
    tail: bytes  # device | module | sys | props | body
    lens: bytes  # the payload's length fields, packed

    @classmethod
    def build(
        cls,
        device_id: str,
        module_id: str | None,
        system_properties: dict[str, str],
        properties: dict[str, str],
        body: bytes,
        *,
        system_json: bytes | None = None,
    ) -> PreparedEvent:
        """`system_json`: the system properties already encoded (`EncodedProperties.encoded`)."""
        dev = device_id.encode("utf-8")
        mod = b"" if module_id is None else module_id.encode("utf-8")
        if len(dev) >= NO_MODULE or len(mod) >= NO_MODULE:
            raise ValueError("device or module id too long")
        sys_b = _json_props(system_properties) if system_json is None else system_json
        props_b = _json_props(properties)
        tail = b"".join((dev, mod, sys_b, props_b, body))
        if PAYLOAD.size + len(tail) > MAX_RECORD:
            raise ValueError("event too large")
        mod_len = NO_MODULE if module_id is None else len(mod)
        lens = _LENS.pack(len(dev), mod_len, len(sys_b), len(props_b), len(body))
        return cls(device_id, module_id, system_properties, properties, body, tail, lens)

    @property
    def frame_size(self) -> int:
        return FRAME.size + PAYLOAD.size + len(self.tail)

    def encode(self, sequence: int, enqueued_ms: int) -> bytes:
        head = _SEQ_TIME.pack(sequence, enqueued_ms) + self.lens
        length = (len(head) + len(self.tail)).to_bytes(4, "little")
        crc = zlib.crc32(self.tail, zlib.crc32(head, zlib.crc32(length)))
        return b"".join((length, crc.to_bytes(4, "little"), head, self.tail))


def decode_payload(position: int, payload: bytes) -> Record:
    seq, ms, dev_len, mod_len, sys_len, props_len, body_len = PAYLOAD.unpack_from(payload)
    at = PAYLOAD.size
    device = payload[at : at + dev_len].decode("utf-8")
    at += dev_len
    module: str | None = None
    if mod_len != NO_MODULE:
        module = payload[at : at + mod_len].decode("utf-8")
        at += mod_len
    sys_props = json.loads(payload[at : at + sys_len]) if sys_len else {}
    at += sys_len
    props = json.loads(payload[at : at + props_len]) if props_len else {}
    at += props_len
    body = payload[at : at + body_len]
    return Record(position, seq, ms, device, module, sys_props, props, body)


def _payload_ok(payload: bytes) -> bool:
    """Lengths inside the payload must add up exactly (a CRC match on garbage is then still caught)."""
    if len(payload) < PAYLOAD.size:
        return False
    _, _, dev_len, mod_len, sys_len, props_len, body_len = PAYLOAD.unpack_from(payload)
    mod = 0 if mod_len == NO_MODULE else mod_len
    return bool(PAYLOAD.size + dev_len + mod + sys_len + props_len + body_len == len(payload))


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def encode_header(first_seq: int, base_offset: int, created_ms: int) -> bytes:
    body = HEADER.pack(MAGIC, first_seq, base_offset, created_ms, 0)[:32]
    return HEADER.pack(MAGIC, first_seq, base_offset, created_ms, zlib.crc32(body))


def decode_header(data: bytes) -> tuple[int, int, int] | None:
    """(first_seq, base_offset, created_ms), or None when torn or not a segment."""
    if len(data) < HEADER_SIZE:
        return None
    magic, first_seq, base_offset, created_ms, crc = HEADER.unpack_from(data)
    if magic != MAGIC or zlib.crc32(data[:32]) != crc:
        return None
    return first_seq, base_offset, created_ms


@dataclass
class SparseIndex:
    """Every ~32 records (or 128 KiB): sequence → file position, plus its enqueued time for time lookups."""

    seqs: array[int] = field(default_factory=lambda: array("q"))
    positions: array[int] = field(default_factory=lambda: array("q"))
    times: array[int] = field(default_factory=lambda: array("q"))
    _since_records: int = INDEX_EVERY_RECORDS
    _since_pos: int = 0

    def note(self, seq: int, position: int, ms: int) -> None:
        if self._since_records >= INDEX_EVERY_RECORDS or position - self._since_pos >= INDEX_EVERY_BYTES:
            self.seqs.append(seq)
            self.positions.append(position)
            self.times.append(ms)
            self._since_records = 0
            self._since_pos = position
        self._since_records += 1

    def position_for_seq(self, seq: int) -> int:
        i = bisect_right(self.seqs, seq) - 1
        return self.positions[i] if i >= 0 else HEADER_SIZE

    def position_before_time(self, ms: int) -> int:
        """A position at or before the first record with time ≥ ms (times never decrease)."""
        i = bisect_right(self.times, ms - 1) - 1
        return self.positions[i] if i >= 0 else HEADER_SIZE


@dataclass(eq=False)  # identity: the partition's list is searched for "is this segment still kept"
class Segment:
    """One segment file; `size` is the committed (fsynced, validated) length readers may see."""

    path: Path
    first_seq: int
    base_offset: int
    created_ms: int
    size: int
    first_time: int | None = None  # None while the segment holds no record
    index: SparseIndex | None = None  # built lazily for sealed segments
    read_fd: int | None = None

    def fd(self) -> int:
        if self.read_fd is None:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        return self.read_fd

    def close(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None


class ScanResult(NamedTuple):
    sparse: SparseIndex
    valid_end: int
    next_seq: int
    first_time: int | None
    last_time: int | None


class _Reader:
    """Buffered positional reads: a few large preads instead of one syscall per record."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.buf = b""
        self.start = 0

    def get(self, pos: int, n: int) -> bytes | None:
        """Bytes [pos, pos + n), or None when that crosses `limit` or the end of the file."""
        end = pos + n
        if end > self.limit:
            return None
        have_end = self.start + len(self.buf)
        if pos < self.start or end > have_end:
            keep = self.buf[pos - self.start :] if self.start <= pos <= have_end else b""
            read_from = pos + len(keep)
            want = min(max(READ_CHUNK, end - read_from), self.limit - read_from)
            self.buf = keep + os.pread(self.fd, want, read_from)
            self.start = pos
            if len(self.buf) < n:
                return None
        off = pos - self.start
        return self.buf[off : off + n]

    def frame(self, pos: int) -> bytes | None:
        """The payload of a valid frame at pos, or None (torn, corrupt or past the limit)."""
        head = self.get(pos, FRAME.size)
        if head is None:
            return None
        length, crc = FRAME.unpack(head)
        if length > MAX_RECORD or length < PAYLOAD.size:
            return None
        payload = self.get(pos + FRAME.size, length)
        if payload is None or zlib.crc32(payload, zlib.crc32(head[:4])) != crc or not _payload_ok(payload):
            return None
        return payload


def scan(fd: int, first_seq: int, file_size: int) -> ScanResult:
    """Validate records from the header on; stops at the first torn or corrupt frame (the log's end)."""
    index = SparseIndex()
    reader = _Reader(fd, file_size)
    pos = HEADER_SIZE
    expect = first_seq
    first_time: int | None = None
    last_time: int | None = None
    while True:
        payload = reader.frame(pos)
        if payload is None:
            break
        seq, ms = struct.unpack_from("<QQ", payload)
        if seq != expect:
            break
        index.note(seq, pos, ms)
        if first_time is None:
            first_time = ms
        last_time = ms
        expect += 1
        pos += FRAME.size + len(payload)
    return ScanResult(index, pos, expect, first_time, last_time)


_T = TypeVar("_T")


def read_records(
    fd: int,
    start: int,
    end: int,
    *,
    min_seq: int,
    max_count: int,
    max_bytes: int,
    min_time: int | None = None,
) -> list[Record]:
    """Records in [start, end) with sequence ≥ min_seq, up to the limits (always at least one).

    With `min_time`, returns only the first record whose time is ≥ min_time. `end` is a committed size,
    so a bad frame here is corruption, not a torn tail.
    """
    return _read(fd, start, end, decode_payload, min_seq=min_seq, max_count=max_count, max_bytes=max_bytes,
                 min_time=min_time)


def read_raw_records(
    fd: int, start: int, end: int, *, partition: int, base_offset: int, min_seq: int, max_count: int,
    max_bytes: int,
) -> list[RawEvent]:
    """Like `read_records`, as `RawEvent`s: property JSON left undecoded (for consumers that splice it)."""

    def decode(position: int, payload: bytes) -> RawEvent:
        seq, ms, dev_len, mod_len, sys_len, props_len, body_len = PAYLOAD.unpack_from(payload)
        at = PAYLOAD.size + dev_len
        device = payload[PAYLOAD.size : at].decode("utf-8")
        module: str | None = None
        if mod_len != NO_MODULE:
            module = payload[at : at + mod_len].decode("utf-8")
            at += mod_len
        props_at = at + sys_len
        body_at = props_at + props_len
        return RawEvent(partition, base_offset + position, seq, ms, device, module, payload[at:props_at],
                        payload[props_at:body_at], payload[body_at : body_at + body_len])

    return _read(fd, start, end, decode, min_seq=min_seq, max_count=max_count, max_bytes=max_bytes)


def _read(
    fd: int,
    start: int,
    end: int,
    decode: Callable[[int, bytes], _T],
    *,
    min_seq: int,
    max_count: int,
    max_bytes: int,
    min_time: int | None = None,
) -> list[_T]:
    out: list[_T] = []
    taken = 0
    reader = _Reader(fd, end)
    pos = start
    while pos < end and len(out) < max_count and taken < max_bytes:
        payload = reader.frame(pos)
        if payload is None:
            raise StreamError(f"corrupt event log at byte {pos} of a segment", code="StreamCorrupted")
        seq, ms = _SEQ_TIME.unpack_from(payload)
        if seq >= min_seq and (min_time is None or ms >= min_time):
            out.append(decode(pos, payload))
            taken += FRAME.size + len(payload)
            if min_time is not None:
                break
        pos += FRAME.size + len(payload)
    return out


class SegmentSlice(NamedTuple):
    """Committed bytes [start, end) of one segment file (files only grow, so they stay readable)."""

    path: str
    start: int
    end: int
    base_offset: int


class ReadPlan(NamedTuple):
    """A `read_raw` resolved to file ranges by the log's owner, so that another process (the feed
    renderer) can do the reading; everything in it is committed."""

    partition: int
    slices: tuple[SegmentSlice, ...]
    min_seq: int
    max_count: int
    max_bytes: int


def read_plan(plan: ReadPlan, fd_of: Callable[[SegmentSlice], int] | None = None) -> list[RawEvent]:
    """The events of `plan`. `fd_of`: the caller's open file of a slice (else each is opened here).
    Raises FileNotFoundError when retention deleted a segment meanwhile: plan again."""
    out: list[RawEvent] = []
    budget = plan.max_bytes
    for piece in plan.slices:
        if len(out) >= plan.max_count or budget <= 0:
            break
        own = fd_of is None
        fd = os.open(piece.path, os.O_RDONLY) if fd_of is None else fd_of(piece)
        try:
            records = read_raw_records(fd, piece.start, piece.end, partition=plan.partition,
                                       base_offset=piece.base_offset, min_seq=plan.min_seq,
                                       max_count=plan.max_count - len(out), max_bytes=budget)
        finally:
            if own:
                os.close(fd)
        out.extend(records)
        budget -= sum(len(r.body) for r in records) + 64 * len(records)
    return out


def read_header(path: Path) -> tuple[int, int, int] | None:
    with open(path, "rb") as f:
        return decode_header(f.read(HEADER_SIZE))


def first_record_time(path: Path, size: int) -> int | None:
    """Enqueued time of a segment's first record (one small read; needed for time retention/lookup)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, FRAME.size + PAYLOAD.size, HEADER_SIZE)
    finally:
        os.close(fd)
    if len(head) < FRAME.size + PAYLOAD.size or HEADER_SIZE + len(head) > size:
        return None
    _seq, ms = struct.unpack_from("<QQ", head, FRAME.size)
    return int(ms)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

