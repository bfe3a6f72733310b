"""Pure twin-document rules: validation against Azure's limits, merge-patch with `$metadata`, and the
diff that turns a replacement into a patch. No I/O, so every rule is testable on plain dicts.

Azure's published rules, enforced here with `BadRequest` naming the offending field:
- keys: 1..1024 UTF-8 bytes, no `.`, `$`, space or control characters (C0, DEL, C1). `$metadata`
  and `$version` are reserved (server-maintained) and cannot be written;
- values: string (≤ 4 KB UTF-8), number (integers in ±2^52, floats finite), boolean, object, null
  (a `null` member deletes the key), arrays (allowed as in newer API versions; they count as a level);
- depth: objects and arrays nest at most 10 levels below the section root (Azure's example with keys
  `one` … `ten` holding `{"property": "value"}` is the deepest valid shape);
- size: tags ≤ 8 KB, desired ≤ 32 KB, reported ≤ 32 KB, computed the way Azure documents it: the sum
  of every key's UTF-8 length plus its value's (strings: UTF-8 bytes without control characters,
  numbers 8, booleans 4, objects and arrays: their contents). `$metadata`/`$version` don't count.
"""

from __future__ import annotations

import copy
import math
from datetime import datetime
from typing import Any

from tether.errors import BadRequest

MAX_DEPTH = 10
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 4 * 1024
TAGS_LIMIT = 8 * 1024
DESIRED_LIMIT = 32 * 1024
REPORTED_LIMIT = 32 * 1024
INT_MIN, INT_MAX = -(2**52), 2**52 - 1
RESERVED_KEYS = frozenset({"$metadata", "$version"})
LAST_UPDATED = "$lastUpdated"
LAST_UPDATED_VERSION = "$lastUpdatedVersion"
NUMBER_SIZE, BOOL_SIZE = 8, 4

_MISSING = object()


def iso(value: datetime) -> str:
    """UTC timestamp as the REST API shows it (`…Z`), matching pydantic's rendering of the device."""
    return value.isoformat().replace("+00:00", "Z")


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _show(key: str) -> str:
    """A key as it may appear in an error message: escaped and clipped."""
    shown = key.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= 64 else shown[:63] + "…"


def check_key(path: str, key: object) -> None:
    if not isinstance(key, str):
        raise BadRequest(f"{path}: keys must be strings", field=path)
    field = f"{path}.{_show(key)}"
    if not key:
        raise BadRequest(f"{path}: keys must not be empty", field=field)
    if key in RESERVED_KEYS:
        raise BadRequest(f"{field}: {key} is maintained by the hub and cannot be written", field=field)
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(f"{field}: keys must be at most {MAX_KEY_BYTES} bytes", field=field)
    for ch in key:
        if ch in ".$ " or _is_control(ch):
            raise BadRequest(
                f"{field}: keys must not contain '.', '$', spaces or control characters", field=field
            )


def _check_scalar(path: str, value: object) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise BadRequest(f"{path}: integers must be between {INT_MIN} and {INT_MAX}", field=path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{path}: numbers must be finite", field=path)
        return
    if isinstance(value, str):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
            raise BadRequest(f"{path}: strings must be at most {MAX_STRING_BYTES} bytes", field=path)
        return
    raise BadRequest(f"{path}: values must be strings, numbers, booleans, objects, arrays or null",
                     field=path)


def check_section(field: str, value: object) -> dict[str, Any]:
    """Validate a client-supplied section body (a patch or a replacement) and return it.

    Iterative, so a hostile, absurdly deep document costs no recursion: the walk stops at the first
    container deeper than `MAX_DEPTH`."""
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be a JSON object", field=field)
    stack: list[tuple[str, dict[str, Any] | list[Any], int]] = [(field, value, 0)]
    while stack:
        path, container, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"{path}: nested deeper than {MAX_DEPTH} levels", field=path)
        if isinstance(container, dict):
            children: list[tuple[str, Any]] = []
            for key, child in container.items():
                check_key(path, key)
                children.append((f"{path}.{key}", child))
        else:
            children = [(f"{path}[{i}]", child) for i, child in enumerate(container)]
        for child_path, child in children:
            if isinstance(child, dict | list):
                stack.append((child_path, child, depth + 1))
            else:
                _check_scalar(child_path, child)
    return value


def _string_size(value: str) -> int:
    size = len(value.encode("utf-8", "surrogatepass"))
    return size - sum(1 for ch in value if _is_control(ch))


def section_size(doc: dict[str, Any]) -> int:
    """Azure's twin size of a section (see the module docstring)."""
    total = 0
    stack: list[Any] = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                total += len(key.encode("utf-8", "surrogatepass"))
                stack.append(child)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            total += _string_size(value)
        elif isinstance(value, bool):
            total += BOOL_SIZE
        elif isinstance(value, int | float):
            total += NUMBER_SIZE
    return total


def check_size(field: str, doc: dict[str, Any], limit: int) -> None:
    size = section_size(doc)
    if size > limit:
        raise BadRequest(f"{field} would be {size} bytes, above the {limit} byte limit", field=field)


def strip_nulls(value: Any) -> Any:
    """A deep copy without null object members (null means "absent" outside of a patch)."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def without_reserved(section: dict[str, Any]) -> dict[str, Any]:
    """Drop `$metadata`/`$version` at the top of a section: SDKs echo a fetched twin back, and those
    read-only keys are ignored rather than refused (like the registry ignores a device's etag)."""
    return {k: v for k, v in section.items() if k not in RESERVED_KEYS}


def stamp(now: datetime, version: int | None) -> dict[str, Any]:
    """The `$metadata` entry for keys written now; desired keys also carry the section version."""
    entry: dict[str, Any] = {LAST_UPDATED: iso(now)}
    if version is not None:
        entry[LAST_UPDATED_VERSION] = version
    return entry


def _fresh_metadata(value: Any, entry: dict[str, Any]) -> dict[str, Any]:
    meta = dict(entry)
    if isinstance(value, dict):
        for key, child in value.items():
            meta[key] = _fresh_metadata(child, entry)
    return meta


def apply_patch(doc: dict[str, Any], meta: dict[str, Any], patch: dict[str, Any],
                entry: dict[str, Any]) -> None:
    """JSON merge-patch `patch` into `doc` in place, keeping `meta` (Azure's `$metadata` tree) in
    step: every written key, and every object on the way to it, gets `entry`; removed keys lose their
    metadata. Recursion is bounded: patches are validated to `MAX_DEPTH` first."""
    for key, value in patch.items():
        if value is None:
            doc.pop(key, None)
            meta.pop(key, None)
            continue
        current = doc.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            child_meta = meta.get(key)
            if not isinstance(child_meta, dict):
                child_meta = {}
            apply_patch(current, child_meta, value, entry)
            child_meta.update(entry)
            meta[key] = child_meta
        else:
            fresh = strip_nulls(value)
            doc[key] = fresh
            meta[key] = _fresh_metadata(fresh, entry)
    meta.update(entry)


def json_equal(a: Any, b: Any) -> bool:
    """Equality with JSON types (Python's `True == 1` must not hold here)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge-patch that turns `old` into `new` (removed keys as null). Sent to devices when a
    service replaces the desired properties, so a device that merges patches ends up at `new`."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        current = old.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(current, dict):
            sub = diff(current, value)
            if sub:
                patch[key] = sub
        elif current is _MISSING or not json_equal(current, value):
            patch[key] = copy.deepcopy(value)
    return patch


__all__ = [
    "DESIRED_LIMIT",
    "MAX_DEPTH",
    "REPORTED_LIMIT",
    "RESERVED_KEYS",
    "TAGS_LIMIT",
    "apply_patch",
    "check_key",
    "check_section",
    "check_size",
    "diff",
    "iso",
    "json_equal",
    "section_size",
    "stamp",
    "strip_nulls",
    "without_reserved",
]
