"""Parse Azure IoT Hub's SQL-like twin query language with a real grammar (lark, LALR(1)).

Supported (keywords case-insensitive, property names case-sensitive):

    SELECT [TOP n] * | item [, item]* FROM devices[.modules|.jobs] [WHERE condition] [GROUP BY path [, path]*]
    item      := path [AS name] | COUNT() [AS name]
    condition := condition OR condition | condition AND condition | NOT condition | ( condition )
               | operand (= | != | <> | < | <= | > | >=) operand
               | operand IN [literal, …] | operand NIN [literal, …]   (parentheses work too)
               | operand                                             (true when it is boolean true)
    operand   := path | literal | FUNCTION(operand, …)
    path      := name ( .name | ['key'] )*        e.g. tags.location.region, properties.reported.z,
                                                   $version, tags['floor-3']
    literal   := 'string' | "string" | number | true | false | null

Functions: IS_DEFINED, IS_NULL, IS_STRING, IS_NUMBER, IS_BOOL, IS_OBJECT, IS_ARRAY, IS_PRIMITIVE,
STARTSWITH, ENDSWITH, CONTAINS. Every failure is a `BadRequest(field="query")`; syntax errors name
the line, column and offending text. The parser is LALR with the transformer applied inline, so no
step of parsing recurses on the input; nesting is bounded (`MAX_NESTING`) before evaluation recurses.
"""

from __future__ import annotations

import math
from typing import Any

from lark import Lark, Token, Transformer
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from tether.errors import BadRequest, TetherError
from tether.messaging.query.evaluator import FUNCTION_ARITY
from tether.messaging.query.nodes import (
    And,
    Call,
    Compare,
    Condition,
    Count,
    Field,
    In,
    Literal,
    Not,
    Operand,
    Or,
    Path,
    Query,
    SelectItem,
    Truth,
)

SOURCES: dict[tuple[str, ...], str] = {
    ("devices",): "devices", ("devices", "modules"): "devices.modules", ("devices", "jobs"): "devices.jobs",
}
"""The collections a query may read: device twins, module twins, devices' job rows."""
MAX_QUERY_CHARS = 32_768
MAX_NESTING = 64
MAX_TOP = 1_000_000

GRAMMAR = r"""
start: _SELECT [top] projection _FROM path [_WHERE condition] [group_by]
group_by: _GROUP _BY path ("," path)*

top: _TOP NUMBER
projection: STAR                                -> star
          | select_item ("," select_item)*     -> items
select_item: _COUNT "(" ")" [_AS NAME]          -> count_item
           | path [_AS NAME]                    -> field_item

condition: and_condition (_OR and_condition)*
and_condition: not_condition (_AND not_condition)*
not_condition: _NOT not_condition               -> negation
             | predicate
predicate: operand COMPARATOR operand           -> comparison
         | operand _IN value_list               -> in_list
         | operand _NIN value_list              -> nin_list
         | "(" condition ")"                    -> parenthesized
         | operand                              -> truth

operand: path | literal | call
call: NAME "(" [operand ("," operand)*] ")"
value_list: "[" [literal ("," literal)*] "]"
          | "(" [literal ("," literal)*] ")"
path: NAME segment*
segment: "." NAME                               -> dotted
       | "[" STRING "]"                         -> bracketed
       | "." DOUBLE_BRACKETED                   -> double_bracketed
literal: STRING                                 -> string
       | NUMBER                                 -> number
       | _TRUE                                  -> true
       | _FALSE                                 -> false
       | _NULL                                  -> null

_SELECT: "select"i
_TOP: "top"i
_COUNT: "count"i
_AS: "as"i
_FROM: "from"i
_WHERE: "where"i
_GROUP: "group"i
_BY: "by"i
_AND: "and"i
_OR: "or"i
_NOT: "not"i
_IN: "in"i
_NIN: "nin"i
_TRUE: "true"i
_FALSE: "false"i
_NULL: "null"i
STAR: "*"
DOUBLE_BRACKETED: /\[\[[^\[\]]{1,128}\]\]/
COMPARATOR: /<=|>=|<>|!=|=|<|>/
NAME: /[A-Za-z_$][A-Za-z0-9_$]*/
STRING: /'(?:[^'\\]|\\.)*'/ | /"(?:[^"\\]|\\.)*"/
NUMBER: /-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?/
%ignore /[ \t\r\n]+/
"""

_ESCAPES = {"'": "'", '"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}
_TERMINAL_NAMES = {
    "NAME": "a property name", "STRING": "a string", "NUMBER": "a number", "STAR": "*",
    "COMPARATOR": "a comparison operator", "LPAR": "(", "RPAR": ")", "LSQB": "[", "RSQB": "]",
    "COMMA": ",", "DOT": ".", "$END": "end of query",
}


def _bad(message: str) -> BadRequest:
    return BadRequest(message, field="query")


def _unescape(token: Token) -> str:
    raw = str(token)[1:-1]
    out: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = raw[i + 1]  # the STRING pattern guarantees a character after a backslash
        if code == "u":
            digits = raw[i + 2 : i + 6]
            if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise _bad(f"bad \\u escape in the string at line {token.line}, column {token.column}")
            out.append(chr(int(digits, 16)))
            i += 6
            continue
        if code not in _ESCAPES:
            raise _bad(f"unknown escape \\{code} in the string at line {token.line}, column {token.column}")
        out.append(_ESCAPES[code])
        i += 2
    return "".join(out)


def _number(token: Token) -> int | float:
    text = str(token)
    if any(c in text for c in ".eE"):
        value = float(text)
        if not math.isfinite(value):
            raise _bad(f"number {text} at line {token.line}, column {token.column} is out of range")
        return value
    return int(text)


class _Build(Transformer[Token, Any]):
    """Turns parse-tree nodes into `nodes` objects as the LALR parser reduces them."""

    def start(self, children: list[Any]) -> Query:
        top, projection, source, where, group = children
        collection = SOURCES.get(source.segments)
        if collection is None:
            raise _bad(f"FROM {source.text} is not supported: FROM devices, devices.modules or devices.jobs")
        group_by: tuple[Path, ...] = group or ()
        if projection is None:  # SELECT *
            if group_by:
                raise _bad("GROUP BY needs a projection list, not SELECT *")
            return Query(True, (), top, where, (), collection)
        items: tuple[SelectItem, ...] = tuple(projection)
        _check_items(items, group_by)
        return Query(False, items, top, where, group_by, collection)

    def group_by(self, children: list[Path]) -> tuple[Path, ...]:
        return tuple(children)

    def top(self, children: list[Token]) -> int:
        (token,) = children
        value = _number(token)
        if not isinstance(value, int) or not 1 <= value <= MAX_TOP:
            raise _bad(f"TOP needs a whole number between 1 and {MAX_TOP}, got {token}")
        return value

    def star(self, _children: list[Any]) -> None:
        return None

    def items(self, children: list[SelectItem]) -> list[SelectItem]:
        return children

    def count_item(self, children: list[Token | None]) -> Count:
        (alias,) = children
        return Count(str(alias) if alias is not None else "")

    def field_item(self, children: list[Any]) -> Field:
        path, alias = children
        return Field(path, str(alias) if alias is not None else path.segments[-1])

    def condition(self, children: list[Condition]) -> Condition:
        return children[0] if len(children) == 1 else Or(tuple(children))

    def and_condition(self, children: list[Condition]) -> Condition:
        return children[0] if len(children) == 1 else And(tuple(children))

    def negation(self, children: list[Condition]) -> Condition:
        return Not(children[0])

    def not_condition(self, children: list[Condition]) -> Condition:
        return children[0]

    def comparison(self, children: list[Any]) -> Compare:
        left, op, right = children
        op_text = "!=" if str(op) == "<>" else str(op)
        return Compare(op_text, left, right)

    def in_list(self, children: list[Any]) -> In:
        return In(children[0], children[1], negated=False)

    def nin_list(self, children: list[Any]) -> In:
        return In(children[0], children[1], negated=True)

    def parenthesized(self, children: list[Condition]) -> Condition:
        return children[0]

    def truth(self, children: list[Operand]) -> Truth:
        return Truth(children[0])

    def operand(self, children: list[Operand]) -> Operand:
        return children[0]

    def call(self, children: list[Any]) -> Call:
        name_token, *args = children
        name = str(name_token).upper()
        arguments = tuple(a for a in args if a is not None)
        arity = FUNCTION_ARITY.get(name)
        if arity is None:
            known = ", ".join(sorted(FUNCTION_ARITY))
            raise _bad(f"unknown function {name_token} at line {name_token.line}, column "
                       f"{name_token.column}; known functions: {known}")
        if len(arguments) != arity:
            raise _bad(f"{name} takes {arity} argument{'s' if arity != 1 else ''}, got {len(arguments)}")
        return Call(name, arguments)

    def value_list(self, children: list[Literal | None]) -> tuple[Any, ...]:
        return tuple(c.value for c in children if c is not None)

    def path(self, children: list[Any]) -> Path:
        first, *rest = children
        return Path((str(first), *rest))

    def dotted(self, children: list[Token]) -> str:
        return str(children[0])

    def bracketed(self, children: list[Token]) -> str:
        return _unescape(children[0])

    def double_bracketed(self, children: list[Token]) -> str:
        """`configurations.[[my-config]].status`: a key that need not be a name (Azure's syntax)."""
        return str(children[0])[2:-2]

    def string(self, children: list[Token]) -> Literal:
        return Literal(_unescape(children[0]))

    def number(self, children: list[Token]) -> Literal:
        return Literal(_number(children[0]))

    def true(self, _children: list[Any]) -> Literal:
        return Literal(True)

    def false(self, _children: list[Any]) -> Literal:
        return Literal(False)

    def null(self, _children: list[Any]) -> Literal:
        return Literal(None)


def _check_items(items: tuple[SelectItem, ...], group_by: tuple[Path, ...]) -> None:
    """Name unnamed COUNT()s like Azure (`$1`, `$2`…), refuse duplicate output names, and require
    every projected path to be a GROUP BY key once the query aggregates."""
    names: set[str] = set()
    aggregate = bool(group_by) or any(isinstance(i, Count) for i in items)
    grouped = {p.segments for p in group_by}
    for item in items:
        if isinstance(item, Field) and aggregate and item.path.segments not in grouped:
            what = "GROUP BY" if group_by else "a GROUP BY clause (the query uses COUNT())"
            raise _bad(f"{item.path.text} must appear in {what}")
        if item.name in names:
            raise _bad(f"the result name {item.name!r} is used twice; give one of them an AS alias")
        if item.name:
            names.add(item.name)


def _name_counts(query: Query) -> Query:
    unnamed = 0
    items: list[SelectItem] = []
    for item in query.items:
        if isinstance(item, Count) and not item.name:
            unnamed += 1
            name = f"${unnamed}"
            while any(i.name == name for i in query.items):
                unnamed += 1
                name = f"${unnamed}"
            item = Count(name)
        items.append(item)
    return Query(query.star, tuple(items), query.top, query.where, query.group_by, query.source)


def _nesting(condition: Condition | None) -> int:
    """Deepest nesting of a condition, computed without recursion."""
    if condition is None:
        return 0
    deepest = 0
    stack: list[tuple[Condition | Operand, int]] = [(condition, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        if isinstance(node, And | Or):
            stack.extend((c, depth + 1) for c in node.conditions)
        elif isinstance(node, Not):
            stack.append((node.condition, depth + 1))
        elif isinstance(node, Compare):
            stack.extend(((node.left, depth + 1), (node.right, depth + 1)))
        elif isinstance(node, In | Truth):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, Call):
            stack.extend((a, depth + 1) for a in node.args)
    return deepest


def _describe(exc: UnexpectedInput, text: str) -> str:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        lines = text.split("\n")
        where = f"line {len(lines)}, column {len(lines[-1]) + 1}"
        found = "unexpected end of query"
    elif isinstance(exc, UnexpectedCharacters):
        where = f"line {exc.line}, column {exc.column}"
        found = f"unexpected character {exc.char!r}"
    elif isinstance(exc, UnexpectedToken):
        where = f"line {exc.line}, column {exc.column}"
        found = f"unexpected {str(exc.token)!r}"
    else:
        where = f"line {getattr(exc, 'line', '?')}, column {getattr(exc, 'column', '?')}"
        found = "unexpected input"
    expected = sorted({_TERMINAL_NAMES.get(t, t.lstrip("_")) for t in getattr(exc, "expected", ())
                       if not t.startswith("__")})
    hint = f"; expected {', '.join(expected[:10])}" if expected else ""
    return f"syntax error at {where}: {found}{hint}"


_PARSER = Lark(GRAMMAR, parser="lalr", lexer="contextual", transformer=_Build(), propagate_positions=False)


def parse_query(text: str) -> Query:
    """The query's tree, or `BadRequest(field="query")` saying what is wrong and where."""
    if not isinstance(text, str) or not text.strip():
        raise _bad("query must be a non-empty string")
    if len(text) > MAX_QUERY_CHARS:
        raise _bad(f"query is longer than {MAX_QUERY_CHARS} characters")
    try:
        query = _PARSER.parse(text)
    except TetherError:
        raise
    except UnexpectedInput as exc:
        raise _bad(_describe(exc, text)) from None
    except LarkError as exc:
        raise _bad(f"malformed query: {exc}") from None
    except RecursionError:
        raise _bad(f"query nests more than {MAX_NESTING} levels") from None
    if not isinstance(query, Query):  # pragma: no cover - the grammar's start rule builds a Query
        raise _bad("malformed query")
    if _nesting(query.where) > MAX_NESTING:
        raise _bad(f"query nests more than {MAX_NESTING} levels")
    return _name_counts(query)


__all__ = ["GRAMMAR", "MAX_NESTING", "MAX_QUERY_CHARS", "parse_query"]
