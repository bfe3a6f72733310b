"""Synchronous disk work of the embedded log, run in worker threads so the event loop keeps serving.

Opening a partition (recovery: drop a torn newest segment, cut a torn tail, find the next sequence),
writing one group-commit batch with a single fsync, scanning a sealed segment for its index, deleting
expired segments.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

from tether.storage.stream.base import StreamError
from tether.storage.stream.segment import (
    HEADER_SIZE,
    ScanResult,
    Segment,
    encode_header,
    first_record_time,
    fsync_dir,
    read_header,
    scan,
    segment_name,
)

log = logging.getLogger(__name__)


class Create(NamedTuple):
    segment: Segment
    header: bytes


class Write(NamedTuple):
    segment: Segment
    position: int
    data: bytes


class Recovered(NamedTuple):
    segments: list[Segment]
    next_seq: int
    last_time: int
    write_fd: int
    truncated: int


def recover(directory: Path, now_ms: int) -> Recovered:
    """Open a partition directory: drop a torn newest segment, cut a torn tail, find the next sequence."""
    if not directory.exists():
        directory.mkdir(parents=True)
        fsync_dir(directory.parent)
    paths = sorted(p for p in directory.glob("*.seg") if p.stem.isdigit())
    segments: list[Segment] = []
    for i, path in enumerate(paths):
        header = read_header(path)
        if header is None or header[0] != int(path.stem):
            if i == len(paths) - 1:  # a crash while rolling: the new segment never got a record
                log.warning("event log: removing torn segment %s", path)
                path.unlink()
                continue
            raise StreamError(f"corrupt segment header in {path}", code="StreamCorrupted")
        first_seq, base, created = header
        segments.append(Segment(path, first_seq, base, created, path.stat().st_size))
    if not segments:
        path = directory / segment_name(0)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, encode_header(0, 0, now_ms), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        segments.append(Segment(path, 0, 0, now_ms, HEADER_SIZE))
    active = segments[-1]
    fd = os.open(active.path, os.O_RDWR)
    try:
        result = scan(fd, active.first_seq, active.size)
        truncated = active.size - result.valid_end
        if truncated:
            log.warning("event log: cutting %d torn bytes from %s", truncated, active.path)
            os.ftruncate(fd, result.valid_end)
            os.fsync(fd)
        for sealed in segments[:-1]:
            sealed.first_time = first_record_time(sealed.path, sealed.size)
    except BaseException:
        os.close(fd)
        raise
    active.size = result.valid_end
    active.index = result.sparse
    active.first_time = result.first_time
    last_time = result.last_time if result.last_time is not None else active.created_ms
    return Recovered(segments, result.next_seq, last_time, fd, truncated)


def write_batch(ops: list[Create | Write], write_fd: int, directory: Path) -> tuple[int, float, bool]:
    """Worker thread: write the batch, fsync once. Returns (active write fd, fsync seconds, created?)."""
    fd = write_fd
    opened: list[int] = []
    try:
        for op in ops:
            if isinstance(op, Create):
                os.fsync(fd)  # the sealed segment is complete on disk before its successor exists
                fd = os.open(op.segment.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                opened.append(fd)
                _pwrite_all(fd, op.header, 0)
            else:
                _pwrite_all(fd, op.data, op.position)
        started = time.perf_counter()
        try:
            os.fsync(fd)
            if opened:
                fsync_dir(directory)
        except OSError as exc:
            raise FsyncFailed() from exc
        elapsed = time.perf_counter() - started
    except BaseException:
        for extra in opened:
            os.close(extra)
        raise
    for extra in opened[:-1]:  # segments sealed within this batch
        os.close(extra)
    return fd, elapsed, bool(opened)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        view = view[n:]
        position += n


class FsyncFailed(Exception):
    """fsync reported an error: the page cache can no longer be trusted (see PostgreSQL's fsyncgate)."""

    def __init__(self) -> None:
        super().__init__("fsync failed")


def scan_path(path: Path, first_seq: int, size: int) -> ScanResult:
    """Own descriptor: retention may close the segment's shared one while this runs in a thread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan(fd, first_seq, size)
    finally:
        os.close(fd)


def unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
