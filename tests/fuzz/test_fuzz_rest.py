"""Fuzz harnesses for the REST input paths (registered in `tests/fuzz/run.py`).

What a client sends reaches these before any write: body parsing (`tether.api.bodies`), the device
model (`Device.model_validate`), the registry's validation (`RegistryService.create/replace/import`,
run for real on a SQLite file) and the twin query parser plus its continuation tokens. Invariants:
hostile input only ever raises a 400 (`BadRequest`, or pydantic's `ValidationError` from the bare
model); a 409 only for an id this run already created; anything accepted is stored as validated
(keys base64 of 16-64 bytes, ids matching Azure's rule) and reads back with the same etag.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import shutil
import string
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from pydantic import ValidationError

from tether.api.bodies import parse_if_match, parse_json_object, parse_ndjson
from tether.errors import BadRequest, Conflict, TetherError
from tether.messaging.query import parse_query
from tether.messaging.query.evaluator import Aggregation, matches, project
from tether.messaging.query.service import _Cursor, decode_token, encode_token
from tether.registry.models import DEVICE_ID_RE, Device, validate_key
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage

from .harness import Harness, corpus, fuzz_examples

T = TypeVar("T")
DEVICE_SEEDS = [data for _, data in corpus("device_json")]
QUERY_SEEDS = [data.decode() for _, data in corpus("query")]
KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
THUMB = "0123456789ABCDEF0123456789ABCDEF01234567"
ID_CHARS = string.ascii_letters + string.digits + "-.%_*?!(),:=@$'"

# --------------------------------------------------------------------------- JSON values

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.one_of(st.text(st.sampled_from(ID_CHARS), min_size=1, max_size=12), st.text(max_size=12),
                st.just("a" * 128), st.just("a" * 129), st.just(""))
keys = st.one_of(st.just(KEY), st.just(""), st.none(),
                 st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
                 st.text(st.sampled_from(string.ascii_letters + "+/="), max_size=50))
thumbs = st.one_of(st.just(THUMB), st.just("ab" * 32),
                   st.text(st.sampled_from("0123456789abcdefABCDEFg"), max_size=66), st.none(), st.just(""))


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(value, json_values)


@st.composite
def device_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Device-shaped JSON: known fields with plausible, boundary or wrong-typed values."""
    auth = {
        "type": draw(_maybe(st.sampled_from(["sas", "selfSigned", "certificateAuthority", "none", "SAS"]))),
        "symmetricKey": draw(_maybe(st.fixed_dictionaries(
            {}, optional={"primaryKey": keys, "secondaryKey": keys, "extra": scalars}))),
        "x509Thumbprint": draw(_maybe(st.fixed_dictionaries(
            {}, optional={"primaryThumbprint": thumbs, "secondaryThumbprint": thumbs}))),
    }
    optional = {
        "deviceId": ids, "status": _maybe(st.sampled_from(["enabled", "disabled", "Enabled"])),
        "statusReason": _maybe(st.text(max_size=130)), "etag": json_values, "generationId": json_values,
        "connectionState": json_values, "cloudToDeviceMessageCount": json_values, "moduleId": json_values,
        "capabilities": _maybe(st.fixed_dictionaries({}, optional={"iotEdge": json_values})),
        "deviceScope": json_values, "parentScopes": json_values, "revokedCertificateSerials": json_values,
        "lastActivityTime": _maybe(st.sampled_from(["0001-01-01T00:00:00Z", "2026-13-01T00:00:00Z"])),
        "unknownField": json_values,
        "authentication": st.one_of(st.just(auth), st.fixed_dictionaries(
            {k: st.just(v) for k, v in auth.items() if draw(st.booleans())}), json_values),
    }
    body: dict[str, Any] = draw(st.fixed_dictionaries({}, optional=optional))
    return body


def deep(depth: int, kind: str) -> bytes:
    """Nesting just under and over what a recursive walk of a parsed body can take."""
    inner = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    return ('{"deviceId":"deep","tags":' + inner + "}").encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(DEVICE_SEEDS),
    device_bodies().map(lambda b: json.dumps(b).encode()),
    st.integers(1, 3000).flatmap(lambda n: st.sampled_from([deep(n, "list"), deep(n, "dict")])),
    st.sampled_from([b"NaN", b'{"a":NaN}', b'{"a":Infinity}', b"1" * 5000, b'{"a":1,"a":2}', b"\xff{}",
                     b'{"deviceId":"\\ud800"}', b"  \n ", b"[]", b"null"]),
)

# --------------------------------------------------------------------------- a real registry


class _Registry:
    """A RegistryService over a SQLite file, driven from synchronous checks on a private loop."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="fuzz-registry-"))
        self.loop = asyncio.new_event_loop()
        self.storage = SqlStorage(f"sqlite+aiosqlite:///{self.directory / 'tether.db'}")
        self.run(self.storage.start())
        self.audit = AuditLog(self.storage.audit)
        self.service = RegistryService(self.storage.devices, self.audit)
        self.created: set[str] = set()
        atexit.register(self.close)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        try:
            self.run(self.audit.close())
            self.run(self.storage.close())
            self.loop.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


_REGISTRY: list[_Registry] = []


def registry() -> _Registry:
    if not _REGISTRY:
        _REGISTRY.append(_Registry())
    return _REGISTRY[0]


def _check_stored(device: Device) -> None:
    assert DEVICE_ID_RE.fullmatch(device.device_id) and device.etag and device.generation_id
    sym = device.authentication.symmetric_key
    for key in (sym.primary_key, sym.secondary_key):
        if key is not None:
            assert validate_key(key) == key
    if device.authentication.type.value == "sas":
        assert sym.primary_key and sym.secondary_key  # generated when not supplied


def _allowed(exc: TetherError, op: str, device_id: Any, created: set[str]) -> None:
    if isinstance(exc, Conflict):  # the id exists already, or the import repeats a record
        assert op == "import" or device_id in created, exc.message
        return
    assert isinstance(exc, BadRequest) and exc.http_status == 400, repr(exc)
    assert exc.message


def check_parse_bodies(raw: bytes) -> None:
    """Body parsing: an object, or a 400 naming what is wrong."""
    for parse in (parse_json_object, lambda r: [v for _, v in parse_ndjson(r)]):
        try:
            parse(raw)
        except BadRequest as exc:
            assert exc.http_status == 400 and exc.message
    try:
        parse_if_match(raw.decode("utf-8", "replace"))
    except BadRequest:
        pass


def check_model(body: Any) -> None:
    try:
        device = Device.model_validate(body)
    except ValidationError:
        return
    assert DEVICE_ID_RE.fullmatch(device.device_id)
    assert Device.model_validate(device.to_wire()).to_wire() == device.to_wire()


def check_registry(case: tuple[str, bytes, str]) -> None:
    """The REST path of PUT/import: parse the body, then the registry validates and writes."""
    op, raw, path_id = case
    reg = registry()
    try:
        body: Any = parse_json_object(raw)
    except BadRequest:
        return
    device_id = body.get("deviceId", path_id) if op == "import" else path_id
    try:
        if op == "create":
            device = reg.run(reg.service.create(path_id, body, actor="fuzz"))
        elif op == "replace":
            if "replace-target" not in reg.created:
                reg.run(reg.service.create("replace-target", {}, actor="fuzz"))
                reg.created.add("replace-target")
            device = reg.run(reg.service.replace("replace-target", body, if_match="*", actor="fuzz"))
        else:
            count = reg.run(reg.service.import_devices([body, dict(body)], actor="fuzz"))
            raise AssertionError(f"a repeated import record was accepted ({count})")
    except TetherError as exc:
        _allowed(exc, op, device_id, reg.created)
        return
    reg.created.add(device.device_id)
    _check_stored(device)
    stored = reg.run(reg.service.get(device.device_id))
    assert stored.etag == device.etag and stored.authentication == device.authentication


registry_cases = st.tuples(
    st.sampled_from(["create", "create", "replace", "import"]),
    st.one_of(raw_bodies, device_bodies().map(lambda b: json.dumps(b).encode())),
    ids,
)

# --------------------------------------------------------------------------- twin query

names = st.sampled_from(["deviceId", "tags", "properties", "reported", "desired", "$version", "status",
                         "x", "select", "from", "devices", "_a1"])
paths = st.lists(st.one_of(names, names.map(lambda n: f"['{n}']")), min_size=1, max_size=4).map(
    lambda parts: parts[0].strip("[]'") + "".join(p if p.startswith("[") else "." + p for p in parts[1:]))
literals = st.one_of(
    st.integers(-(10**30), 10**30).map(str), st.sampled_from(["1.5e308", "1e999", "-.5", "true", "null"]),
    st.text(max_size=8).map(lambda s: "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"),
    st.sampled_from(["'\\u12'", "'\\x'", "'\\uD800'", '"a\\"b"']),
)
operands = st.one_of(paths, literals, st.builds(
    lambda f, args: f"{f}({', '.join(args)})",
    st.sampled_from(["IS_DEFINED", "STARTSWITH", "CONTAINS", "is_null", "UNKNOWN_FN"]),
    st.lists(st.one_of(paths, literals), max_size=3)))
conditions = st.recursive(
    st.one_of(
        st.builds(lambda a, op, b: f"{a} {op} {b}", operands,
                  st.sampled_from(["=", "!=", "<>", "<", "<=", ">", ">=", "=="]), operands),
        st.builds(lambda a, kw, vs: f"{a} {kw} [{', '.join(vs)}]", operands, st.sampled_from(["IN", "NIN"]),
                  st.lists(literals, max_size=3)),
        operands,
    ),
    lambda inner: st.one_of(
        st.builds(lambda a, op, b: f"{a} {op} {b}", inner, st.sampled_from(["AND", "OR", "and"]), inner),
        inner.map(lambda c: f"NOT {c}"), inner.map(lambda c: f"({c})")),
    max_leaves=8,
)
queries = st.builds(
    lambda top, proj, src, where, group: f"SELECT {top}{proj} FROM {src}{where}{group}",
    st.sampled_from(["", "TOP 5 ", "TOP 0 ", "TOP -1 ", "TOP 1.5 ", "TOP 99999999999 "]),
    st.one_of(st.just("*"), st.lists(st.one_of(paths, st.just("COUNT()"), paths.map(lambda p: p + " AS n")),
                                     min_size=1, max_size=3).map(", ".join)),
    st.sampled_from(["devices", "devices.modules", "x"]),
    st.one_of(st.just(""), conditions.map(lambda c: f" WHERE {c}")),
    st.one_of(st.just(""),
              st.lists(paths, min_size=1, max_size=2).map(lambda p: " GROUP BY " + ", ".join(p))),
)
query_inputs = st.one_of(
    queries, st.text(max_size=80), st.sampled_from(QUERY_SEEDS),
    st.integers(1, 400).map(lambda n: "SELECT * FROM devices WHERE " + "(" * n + "x = 1" + ")" * n),
    st.integers(1, 400).map(lambda n: "SELECT * FROM devices WHERE " + "NOT " * n + "x"),
    st.integers(1, 300).map(lambda n: "SELECT * FROM devices WHERE " + " AND ".join(["x = 1"] * n)),
)
TWINS = [
    {"deviceId": "dev1", "status": "enabled", "$version": 3, "tags": {"x": 1, "floor-3": "a"},
     "properties": {"reported": {"x": [1, "two"], "$version": 2}, "desired": {"x": None}}},
    {"deviceId": "dev2", "tags": {}, "properties": {"reported": {"x": {"y": 1e308}}, "desired": {}}},
]


def check_query(text: str) -> None:
    try:
        query = parse_query(text)
    except BadRequest as exc:
        assert exc.field == "query" and exc.message
        return
    aggregate = Aggregation(query)
    for twin in TWINS:
        if matches(query, twin):
            project(query, twin)
            aggregate.add(twin)
    if any(type(item).__name__ == "Count" for item in query.items):
        aggregate.rows()
    cursor = _Cursor("dev1", 3, 7)
    assert decode_token(text, encode_token(text, cursor)) == cursor


def check_token(case: tuple[str, str]) -> None:
    text, token = case
    try:
        decode_token(text, token)
    except BadRequest as exc:
        assert exc.field == "x-ms-continuation"


tokens = st.one_of(
    st.text(max_size=60),
    st.text(st.sampled_from(string.ascii_letters + string.digits + "-_="), max_size=80),
    json_values.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
    st.builds(lambda a, o, n, v: base64.urlsafe_b64encode(json.dumps(
        {"v": v, "q": "3e6b4c0f2b9f1a1d", "a": a, "o": o, "n": n}).encode()).decode().rstrip("="),
        json_values, json_values, json_values, st.sampled_from([1, 1.0, True, "1", 2])),
)

HARNESSES = [
    Harness("rest.parse_bodies", raw_bodies, check_parse_bodies, seeds=DEVICE_SEEDS),
    Harness("rest.device_model", st.one_of(device_bodies(), json_values), check_model),
    Harness("rest.registry_validation", registry_cases, check_registry,
            seeds=[("create", seed, "seed-dev") for seed in DEVICE_SEEDS]),
    Harness("query.parse", query_inputs, check_query, seeds=QUERY_SEEDS),
    Harness("query.continuation_token",
            st.tuples(st.sampled_from(QUERY_SEEDS) | st.text(max_size=20), tokens), check_token),
]


@pytest.mark.parametrize("harness", HARNESSES, ids=[h.name for h in HARNESSES])
def test_harness_never_crashes(harness: Harness) -> None:
    # A registry write costs milliseconds: a smaller default keeps `make test` fast; FUZZ_EXAMPLES and
    # `python -m tests.fuzz.run --count N` run as many as asked.
    assert harness.run(fuzz_examples(400)) >= len(harness.seeds)


def test_corpus_is_present() -> None:
    assert len(DEVICE_SEEDS) >= 3 and len(QUERY_SEEDS) >= 3


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_regression_deeply_nested_device_body_is_a_400(kind: str) -> None:
    """Found by `rest.registry_validation`: JSON nested ~500-990 deep parses, then the registry's
    null-stripping walk raised RecursionError (an HTTP 500 from `PUT /devices/{id}`)."""
    reg = registry()
    body = parse_json_object(deep(700, kind))
    for call in (lambda: reg.service.create("deep", body, actor="fuzz"),
                 lambda: reg.service.import_devices([body], actor="fuzz")):
        with pytest.raises(BadRequest):
            reg.run(call())
