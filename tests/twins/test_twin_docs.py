"""The pure twin-document rules: size formula, merge-patch with metadata, diff round trip, and
validation that refuses hostile documents with BadRequest only."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import BadRequest
from tether.messaging.twin_docs import (
    apply_patch,
    check_section,
    diff,
    json_equal,
    section_size,
    strip_nulls,
)

keys = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5)
docs = st.recursive(
    scalars,
    lambda children: st.dictionaries(keys, children, max_size=4) | st.lists(children, max_size=3),
    max_leaves=12,
)
sections = st.dictionaries(keys, docs, max_size=5).map(strip_nulls)


def test_size_follows_azure_formula() -> None:
    assert section_size({}) == 0
    assert section_size({"ab": "cde"}) == 2 + 3
    assert section_size({"n": 1, "f": 1.5, "b": True}) == 3 + 8 + 8 + 4
    assert section_size({"o": {"é": "ü"}}) == 1 + 2 + 2  # UTF-8 bytes
    assert section_size({"c": "a\x01b"}) == 1 + 2  # control characters don't count
    assert section_size({"l": [1, "xy", {"k": False}]}) == 1 + 8 + 2 + 1 + 4


def test_apply_patch_stamps_written_keys_and_ancestors() -> None:
    doc: dict[str, Any] = {"a": {"b": 1, "c": 2}, "d": 1}
    meta: dict[str, Any] = {"a": {"b": {"t": 0}, "c": {"t": 0}, "t": 0}, "d": {"t": 0}, "t": 0}
    apply_patch(doc, meta, {"a": {"b": 5, "e": {"f": None, "g": 1}}, "d": None}, {"t": 1})
    assert doc == {"a": {"b": 5, "c": 2, "e": {"g": 1}}}
    assert meta == {"a": {"b": {"t": 1}, "c": {"t": 0}, "e": {"t": 1, "g": {"t": 1}}, "t": 1}, "t": 1}


@settings(max_examples=300, deadline=None)
@given(sections, sections)
def test_diff_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    doc = copy.deepcopy(old)
    apply_patch(doc, {}, diff(old, new), {})
    assert json_equal(doc, new)
    assert diff(new, new) == {}


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
        lambda children: (
            st.dictionaries(st.text(max_size=6), children, max_size=4) | st.lists(children, max_size=3)
        ),
        max_leaves=30,
    )
)
def test_check_section_raises_only_bad_request(value: Any) -> None:
    try:
        check_section("tags", {"root": value})
    except BadRequest as exc:
        assert exc.field is not None and exc.field.startswith("tags")


def test_hostile_depth_is_refused_without_recursion() -> None:
    deep: Any = 1
    for _ in range(50_000):
        deep = {"a": deep}
    try:
        check_section("properties.reported", {"x": deep})
    except BadRequest as exc:
        assert "deeper than 10" in exc.message
    else:
        raise AssertionError("accepted")


def test_json_equal_distinguishes_types() -> None:
    assert not json_equal(True, 1) and not json_equal(0, False) and json_equal(1, 1.0)
    assert json_equal({"a": [1, {"b": None}]}, json.loads('{"a": [1, {"b": null}]}'))
    assert not json_equal({"a": 1}, {"a": 1, "b": 2}) and not json_equal([1], [1, 2])
