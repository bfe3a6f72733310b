"""Query semantics over plain twin documents: undefined values, JSON types, three-valued logic,
functions, projections and aggregation."""

from __future__ import annotations

from typing import Any

from tether.messaging.query import parse_query
from tether.messaging.query.evaluator import Aggregation, matches, project

DOCS: list[dict[str, Any]] = [
    {
        "deviceId": "d1",
        "status": "enabled",
        "tags": {"loc": "a", "floor": 1, "on": True},
        "properties": {"reported": {"z": 5, "fw": "1.2.0"}, "desired": {"$version": 3}},
    },
    {
        "deviceId": "d2",
        "status": "disabled",
        "tags": {"loc": "b", "floor": 2.5, "on": False},
        "properties": {"reported": {"z": 2}, "desired": {"$version": 1}},
    },
    {
        "deviceId": "d3",
        "status": "enabled",
        "tags": {"loc": "a", "floor": "2", "nested": {"k": [1, 2]}},
        "properties": {"reported": {"z": None}, "desired": {"$version": 1}},
    },
    {
        "deviceId": "d4",
        "status": "enabled",
        "tags": {},
        "properties": {"reported": {}, "desired": {"$version": 1}},
    },
]


def ids(where: str) -> list[str]:
    query = parse_query(f"SELECT * FROM devices WHERE {where}")
    return [d["deviceId"] for d in DOCS if matches(query, d)]


def test_comparisons_by_type() -> None:
    assert ids("tags.loc = 'a'") == ["d1", "d3"]
    assert ids("properties.reported.z > 3") == ["d1"]
    assert ids("tags.floor >= 1") == ["d1", "d2"]  # "2" is a string: not compared with numbers
    assert ids("tags.floor < 'z'") == ["d3"]
    assert ids("tags.on = true") == ["d1"] and ids("tags.on = 1") == []
    assert ids("properties.reported.z = null") == ["d3"]
    assert ids("tags.nested = tags.nested") == ["d3"]


def test_undefined_never_matches_even_with_not_equal_or_not() -> None:
    assert ids("tags.loc != 'a'") == ["d2"]  # d4 has no loc: undefined, not true
    assert ids("NOT tags.loc = 'a'") == ["d2"]
    assert ids("NOT (tags.loc = 'a') OR status = 'enabled'") == ["d1", "d2", "d3", "d4"]
    assert ids("tags.loc = 'a' AND tags.missing = 1") == []
    assert ids("tags.missing = 1 OR deviceId = 'd4'") == ["d4"]


def test_and_or_not_precedence() -> None:
    assert ids("status = 'disabled' OR tags.loc = 'a' AND properties.reported.z > 3") == ["d1", "d2"]
    assert ids("(status = 'disabled' OR tags.loc = 'a') AND properties.reported.z > 1") == ["d1", "d2"]
    assert ids("NOT status = 'enabled' AND tags.loc = 'b'") == ["d2"]


def test_in_nin_and_functions() -> None:
    assert ids("tags.loc IN ['b', 'c']") == ["d2"]
    assert ids("tags.floor IN [1, '2']") == ["d1", "d3"]
    assert ids("tags.loc NIN ['a']") == ["d2"]  # undefined stays out
    assert ids("IS_DEFINED(tags.loc)") == ["d1", "d2", "d3"]
    assert ids("NOT IS_DEFINED(tags.loc)") == ["d4"]
    assert ids("IS_NULL(properties.reported.z)") == ["d3"]
    assert ids("IS_STRING(tags.floor) OR IS_BOOL(tags.on) AND NOT tags.on") == ["d2", "d3"]
    assert ids("IS_OBJECT(tags.nested) AND IS_ARRAY(tags.nested.k)") == ["d3"]
    assert ids("STARTSWITH(properties.reported.fw, '1.') AND ENDSWITH(deviceId, '1')") == ["d1"]
    assert ids("CONTAINS(deviceId, '3')") == ["d3"]
    assert ids("tags.on") == ["d1"]
    assert ids("properties.desired.$version > 1") == ["d1"]
    assert ids("tags['loc'] = 'b'") == ["d2"]


def test_projection_leaves_out_undefined() -> None:
    query = parse_query("SELECT deviceId, tags.loc AS place, properties.reported.z FROM devices")
    assert [project(query, d) for d in DOCS] == [
        {"deviceId": "d1", "place": "a", "z": 5},
        {"deviceId": "d2", "place": "b", "z": 2},
        {"deviceId": "d3", "place": "a", "z": None},
        {"deviceId": "d4"},
    ]


def test_count_and_group_by() -> None:
    query = parse_query("SELECT tags.loc, COUNT() AS n FROM devices GROUP BY tags.loc")
    agg = Aggregation(query)
    for doc in DOCS:
        agg.add(doc)
    assert sorted(agg.rows(), key=lambda r: r.get("loc", "")) == [
        {"n": 1},
        {"loc": "a", "n": 2},
        {"loc": "b", "n": 1},
    ]
    empty = Aggregation(parse_query("SELECT COUNT() AS total FROM devices WHERE status = 'nope'"))
    assert empty.rows() == [{"total": 0}]
