"""The query grammar: the supported forms parse, malformed queries are BadRequest(field="query")
naming the position, and no input makes the parser fail any other way."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import BadRequest
from tether.messaging.query import parse_query
from tether.messaging.query.nodes import And, Compare, Count, Field, In, Literal, Not, Or, Path, Truth


def bad(text: str) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        parse_query(text)
    assert err.value.field == "query"
    return err.value


def test_select_star_with_where() -> None:
    q = parse_query("SELECT * FROM devices WHERE tags.x = 'y' AND properties.reported.z > 3")
    assert q.star and q.item_type == "twin" and not q.aggregate
    assert q.where == And(
        (
            Compare("=", Path(("tags", "x")), Literal("y")),
            Compare(">", Path(("properties", "reported", "z")), Literal(3)),
        )
    )


def test_keywords_are_case_insensitive_names_are_not() -> None:
    q = parse_query("sElEcT * fRoM devices wHeRe Tags.X = 'y' oR NOT tags.b")
    assert q.where == Or((Compare("=", Path(("Tags", "X")), Literal("y")), Not(Truth(Path(("tags", "b"))))))


def test_and_binds_tighter_than_or_and_parentheses_override() -> None:
    a, b, c = (Compare("=", Path((n,)), Literal(1)) for n in "abc")
    assert parse_query("SELECT * FROM devices WHERE a = 1 OR b = 1 AND c = 1").where == Or((a, And((b, c))))
    assert parse_query("SELECT * FROM devices WHERE (a = 1 OR b = 1) AND c = 1").where == And((Or((a, b)), c))
    assert parse_query("SELECT * FROM devices WHERE NOT a = 1 AND b = 1").where == And((Not(a), b))


def test_projections_aggregates_and_literals() -> None:
    q = parse_query("SELECT deviceId, tags.loc AS where_, properties.reported.z FROM devices")
    assert q.items == (
        Field(Path(("deviceId",)), "deviceId"),
        Field(Path(("tags", "loc")), "where_"),
        Field(Path(("properties", "reported", "z")), "z"),
    )
    assert q.item_type == "raw"
    q = parse_query("SELECT tags.location, COUNT() AS n FROM devices GROUP BY tags.location")
    assert q.aggregate and q.items[1] == Count("n") and q.group_by == (Path(("tags", "location")),)
    assert parse_query("SELECT COUNT() FROM devices").items == (Count("$1"),)
    q = parse_query("SELECT * FROM devices WHERE tags.v NIN [-1.5e2, 'it\\'s', \"dq\", true, FALSE, null]")
    assert q.where == In(Path(("tags", "v")), (-150.0, "it's", "dq", True, False, None), negated=True)
    q = parse_query("SELECT TOP 3 * FROM devices WHERE tags['floor-3'] IN (1, 2) AND $version >= 2")
    assert q.top == 3
    assert q.where == And(
        (In(Path(("tags", "floor-3")), (1, 2), negated=False), Compare(">=", Path(("$version",)), Literal(2)))
    )
    assert parse_query("SELECT * FROM devices WHERE a <> 1").where == Compare("!=", Path(("a",)), Literal(1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT * FROM devices WHERE", "line 1, column 28: unexpected end of query"),
        ("SELEC * FROM devices", "line 1, column 1: unexpected 'SELEC'"),
        ("SELECT * FROM devices\nWHERE tags.x = = 1", "line 2, column 16: unexpected '='"),
        ("SELECT * FROM devices WHERE tags.x = 'open", "line 1, column 38: unexpected character"),
        ("SELECT * FROM devices WHERE tags.x # 1", "line 1, column 36: unexpected character '#'"),
        ("SELECT * FROM devices WHERE a = 1 b = 2", "line 1, column 35: unexpected 'b'"),
    ],
)
def test_syntax_errors_name_the_position(text: str, expected: str) -> None:
    err = bad(text)
    assert expected in err.message, err.message
    assert err.message.startswith("syntax error at ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "non-empty"),
        ("SELECT * FROM devices.configurations", "is not supported: FROM devices, devices.modules or"),
        ("SELECT * FROM devices WHERE nope(tags.x)", "unknown function nope at line 1, column 29"),
        ("SELECT * FROM devices WHERE IS_DEFINED(a, b)", "IS_DEFINED takes 1 argument"),
        ("SELECT tags.x FROM devices GROUP BY tags.y", "tags.x must appear in GROUP BY"),
        ("SELECT tags.x, COUNT() FROM devices", "tags.x must appear in a GROUP BY"),
        ("SELECT * FROM devices GROUP BY tags.y", "GROUP BY needs a projection"),
        ("SELECT tags.x, properties.desired.x FROM devices", "'x' is used twice"),
        ("SELECT TOP 0 * FROM devices", "TOP needs a whole number"),
        ("SELECT TOP 1.5 * FROM devices", "TOP needs a whole number"),
        ("SELECT * FROM devices WHERE a = 1e999", "out of range"),
        ("SELECT * FROM devices WHERE a = 'bad \\q escape'", "unknown escape"),
        ("SELECT * FROM devices WHERE " + "NOT " * 100 + "a", "nests more than"),
        ("SELECT * FROM devices WHERE a = '" + "x" * 40_000 + "'", "longer than"),
    ],
)
def test_semantic_errors_are_bad_requests(text: str, expected: str) -> None:
    assert expected in bad(text).message


def test_long_flat_conditions_and_deep_parentheses_are_fine() -> None:
    many = " OR ".join(f"tags.k = {i}" for i in range(1500))
    q = parse_query(f"SELECT * FROM devices WHERE {many}")
    assert isinstance(q.where, Or) and len(q.where.conditions) == 1500
    q = parse_query("SELECT * FROM devices WHERE " + "(" * 500 + "a = 1" + ")" * 500)
    assert q.where == Compare("=", Path(("a",)), Literal(1))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_bad_request(text: str) -> None:
    try:
        parse_query(text)
    except BadRequest as exc:
        assert exc.field == "query"


TOKENS = [
    "SELECT",
    "TOP",
    "*",
    "COUNT()",
    "AS",
    "FROM",
    "devices",
    "WHERE",
    "GROUP",
    "BY",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "(",
    ")",
    "[",
    "]",
    ",",
    ".",
    "=",
    "!=",
    "<>",
    "<",
    ">=",
    "'s'",
    '"d"',
    "1",
    "-2.5",
    "1e400",
    "true",
    "null",
    "tags",
    "x",
    "$version",
    "IS_DEFINED",
    "STARTSWITH",
    "['k']",
    "'\\u00e9'",
    "'\\x'",
]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25))
def test_token_soup_raises_only_bad_request(tokens: list[str]) -> None:
    try:
        parse_query("SELECT " + " ".join(tokens))
    except BadRequest as exc:
        assert exc.field == "query"
