"""Consumer groups and checkpoints of the embedded stream: small JSON files, replaced atomically.

`groups.json` lists the groups besides `$Default` (which always exists); `checkpoints/{group}.json` maps
partition → sequence. Every change is write-temp + fsync + rename + fsync(dir), so after a crash each file
is either the old or the new version, never a mix. The in-memory copy is authoritative while open.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from tether.errors import BadRequest, Conflict, NotFound
from tether.storage.stream.base import DEFAULT_CONSUMER_GROUP, check_partition, validate_consumer_group
from tether.storage.stream.segment import fsync_dir


def write_json_atomic(path: Path, data: Any) -> None:
    """Durably replace `path` with `data` as JSON (synchronous; run it in a worker thread)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


class LocalCheckpointStore:
    """Groups and checkpoints under one directory; calls are serialised by one lock (they are rare)."""

    def __init__(self, directory: Path, partition_count: int) -> None:
        self._dir = directory
        self._cp_dir = directory / "checkpoints"
        self._partition_count = partition_count
        self._groups: list[str] = []
        self._checkpoints: dict[str, dict[int, int]] = {}
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the files (synchronous, at start-up); stray temp files from a crash are removed."""
        self._cp_dir.mkdir(parents=True, exist_ok=True)
        for stray in [*self._dir.glob("*.tmp"), *self._cp_dir.glob("*.tmp")]:
            stray.unlink(missing_ok=True)
        groups_file = self._dir / "groups.json"
        groups: list[str] = []
        if groups_file.exists():
            groups = [str(g) for g in _read_json(groups_file).get("groups", [])]
        self._groups = [g for g in groups if g != DEFAULT_CONSUMER_GROUP]
        self._checkpoints = {}
        for group in [DEFAULT_CONSUMER_GROUP, *self._groups]:
            path = self._cp_file(group)
            if path.exists():
                raw = _read_json(path)
                self._checkpoints[group] = {int(p): int(s) for p, s in raw.items()}
            else:
                self._checkpoints[group] = {}

    def _cp_file(self, group: str) -> Path:
        return self._cp_dir / f"{group}.json"

    async def consumer_groups(self) -> list[str]:
        return [DEFAULT_CONSUMER_GROUP, *sorted(self._groups)]

    async def create_consumer_group(self, name: str) -> None:
        validate_consumer_group(name)
        async with self._lock:
            if name == DEFAULT_CONSUMER_GROUP or name in self._groups:
                raise Conflict(f"consumer group {name!r} already exists", code="ConsumerGroupAlreadyExists")
            groups = sorted([*self._groups, name])
            await asyncio.to_thread(write_json_atomic, self._dir / "groups.json", {"groups": groups})
            self._groups = groups
            self._checkpoints[name] = {}

    async def delete_consumer_group(self, name: str) -> None:
        if name == DEFAULT_CONSUMER_GROUP:
            raise BadRequest(
                "the $Default consumer group cannot be deleted", code="ConsumerGroupNotDeletable"
            )
        async with self._lock:
            if name not in self._groups:
                raise NotFound(f"consumer group {name!r} not found", code="ConsumerGroupNotFound")
            groups = [g for g in self._groups if g != name]
            await asyncio.to_thread(write_json_atomic, self._dir / "groups.json", {"groups": groups})
            self._groups = groups
            self._checkpoints.pop(name, None)
            await asyncio.to_thread(self._cp_file(name).unlink, missing_ok=True)

    def _require(self, group: str, partition: int) -> dict[int, int]:
        check_partition(partition, self._partition_count)
        cps = self._checkpoints.get(group)
        if cps is None:
            raise NotFound(f"consumer group {group!r} not found", code="ConsumerGroupNotFound")
        return cps

    async def checkpoint(self, group: str, partition: int, sequence_number: int) -> None:
        if sequence_number < 0:
            raise BadRequest("sequence_number must be >= 0", field="sequence_number")
        async with self._lock:
            cps = self._require(group, partition)
            updated = {**cps, partition: sequence_number}
            doc = {str(p): s for p, s in sorted(updated.items())}
            await asyncio.to_thread(write_json_atomic, self._cp_file(group), doc)
            if group in self._checkpoints:  # not deleted meanwhile
                self._checkpoints[group] = updated

    async def get_checkpoint(self, group: str, partition: int) -> int | None:
        return self._require(group, partition).get(partition)
