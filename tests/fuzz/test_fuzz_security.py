"""Fuzz harnesses for the credential parsers (registered in `tests/fuzz/run.py`).

Both parsers read attacker-controlled text before anything is authenticated: the SAS token arrives
as an MQTT password or an HTTP `Authorization` header, connection strings come from operators and
the CLI. Invariants: hostile text only ever raises `SasError("malformed")` / `ConnectionStringError`
(a `BadRequest`); what parses is well-formed (printable ASCII resource, 32-byte signature, integer
expiry); tokens built by `build_token` parse back and verify with their key only; signature checks,
time checks and scope checks never raise; parsed connection strings print and re-parse to themselves
and never show a key in `repr()`.
"""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import strategies as st

from tether.errors import BadRequest
from tether.security.connstr import (
    ConnectionStringError,
    DeviceConnectionString,
    ServiceConnectionString,
    parse_connection_string,
)
from tether.security.sas import (
    MAX_TOKEN_LENGTH,
    PREFIX,
    SasError,
    SasToken,
    TokenVerifier,
    build_token,
    parse_token,
    scope_covers,
    verify_signature,
)

from .harness import Harness, corpus, fuzz_examples

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
OTHER_KEY = base64.b64encode(b"k" * 32).decode()
SAS_SEEDS = [data.decode("utf-8", "replace") for _, data in corpus("sas")]
CONNSTR_SEEDS = [data.decode("utf-8", "replace") for _, data in corpus("connstr")]
PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))

# --------------------------------------------------------------------------- shared text strategies

any_text = st.text(max_size=120)
ascii_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=80)
percent = st.sampled_from(["%", "%2", "%2F", "%2f", "%3D", "%00", "%0A", "%20", "%7F", "%80", "%C3%A9",
                           "%E2%82%AC", "%FF", "%zz", "%%", "%25"])
url_piece = st.one_of(st.text(st.sampled_from(PRINTABLE + " "), max_size=12), percent)
url_text = st.lists(url_piece, max_size=8).map("".join)
base64_text = st.one_of(
    st.binary(min_size=0, max_size=48).map(lambda b: base64.b64encode(b).decode()),
    st.text(st.sampled_from(string.ascii_letters + string.digits + "+/=-_%"), max_size=60),
)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[str]) -> str:
    """A seed with a few character-level edits (flip, insert, delete, truncate, duplicate)."""
    text = list(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        if op == "replace" and text:
            text[at] = draw(st.characters())
        elif op == "insert":
            piece = st.one_of(percent, st.text(max_size=3), st.sampled_from(["&", "=", ";"]))
            text[at:at] = list(draw(piece))
        elif op == "delete" and text:
            del text[at]
        elif op == "truncate":
            del text[at:]
        elif op == "duplicate" and text:
            text[at:at] = text[at : at + draw(st.integers(1, 20))]
    return "".join(text)


# --------------------------------------------------------------------------- SAS tokens

sas_field = st.tuples(
    st.sampled_from(["sr", "sig", "se", "skn", "SR", "", "x", "sr ", " se"]),
    st.sampled_from(["=", "=", "=", "", "=="]),
    st.one_of(url_text, base64_text, st.integers(-5, 10**20).map(str), st.just("")),
)
structured_tokens = st.tuples(
    st.sampled_from([PREFIX, PREFIX, PREFIX, "sharedaccesssignature ", "SharedAccessSignature", ""]),
    st.lists(sas_field, max_size=6),
).map(lambda t: t[0] + "&".join(name + sep + value for name, sep, value in t[1]))
sas_inputs = st.one_of(
    any_text,
    ascii_text.map(lambda s: PREFIX + s),
    structured_tokens,
    mutated(SAS_SEEDS),
    st.integers(MAX_TOKEN_LENGTH - 4, MAX_TOKEN_LENGTH + 4).map(lambda n: (PREFIX + "sr=" + "a" * n)[:n]),
)


def check_parse_token(text: str) -> None:
    try:
        token = parse_token(text)
    except SasError as exc:
        assert exc.reason == "malformed" and exc.detail
        assert len(text) < 40 or text not in str(exc)  # the message never quotes the token
        return
    assert isinstance(token, SasToken)
    assert len(text) <= MAX_TOKEN_LENGTH and text.startswith(PREFIX)
    assert token.resource and all(c in PRINTABLE for c in token.resource)
    assert len(token.signature) == 32 and token.expiry >= 0
    assert token.policy_name is None or all(c in PRINTABLE for c in token.policy_name)
    # Nothing downstream of the parser may raise on a parsed token either.
    assert verify_signature(token, [None, "", "not base64!", KEY]) in (True, False)
    assert scope_covers(token.resource, "localhost/devices/dev1") in (True, False)
    verifier = TokenVerifier(clock_skew_s=300, max_lifetime_s=3600, now=lambda: 1_700_000_000.0)
    try:
        verifier.verify(token, [KEY, OTHER_KEY])
    except SasError as exc:
        assert exc.reason in ("expired", "lifetime-too-long", "bad-signature")


resources = st.one_of(
    st.text(st.sampled_from(PRINTABLE), min_size=1, max_size=60),
    st.builds(lambda h, d: f"{h}/devices/{d}", st.sampled_from(["localhost", "HUB.example.com:8443"]),
              st.text(st.sampled_from(string.ascii_letters + "-.%_*?!(),:=@$'"), min_size=1, max_size=20)),
)


def check_build_round_trip(case: tuple[str, int, str | None]) -> None:
    resource, expiry, policy = case
    token = parse_token(build_token(resource, KEY, expiry, policy))
    assert (token.resource, token.expiry, token.policy_name) == (resource, expiry, policy)
    assert verify_signature(token, [KEY])
    assert verify_signature(token, [OTHER_KEY, KEY])  # any key may match
    assert not verify_signature(token, [OTHER_KEY])


def _parts(resource: str) -> list[str]:
    return (resource[:-1] if resource.endswith("/") else resource).split("/")


def check_scope(case: tuple[str, str]) -> None:
    token_resource, target = case
    covered = scope_covers(token_resource, target)
    assert covered in (True, False)
    token, wanted = _parts(token_resource), _parts(target)
    if covered:  # same host (any case), and the token's path is a whole-segment prefix of the target's
        assert token[0].lower() == wanted[0].lower() and token[1:] == wanted[1 : len(token)]
        assert "" not in token and "" not in wanted
    elif "" not in token:
        assert scope_covers(token_resource, token_resource)  # a valid scope covers itself
    if "" not in wanted and len(wanted) > 1:
        assert not scope_covers(target + "x", target)


scope_segments = st.lists(st.sampled_from(["localhost", "LOCALHOST", "devices", "dev1", "dev10", "modules",
                                           "m", "", ".", ".."]), min_size=1, max_size=5).map("/".join)

# --------------------------------------------------------------------------- connection strings

CS_KEYS = ["HostName", "DeviceId", "ModuleId", "SharedAccessKey", "SharedAccessKeyName",
           "SharedAccessSignature", "GatewayHostName", "x509", "hostname", "Unknown", ""]
cs_value = st.one_of(
    st.sampled_from(["localhost", "hub.example.com:8443", "[::1]:8883", "127.0.0.1", "dev1", "true",
                     "TRUE", "false", KEY, KEY[:-1], "iothubowner", "a" * 300, ""]),
    base64_text,
    st.text(max_size=20),
)
structured_connstr = st.lists(
    st.tuples(st.sampled_from(CS_KEYS), st.sampled_from(["=", "=", ""]), cs_value), max_size=7
).map(lambda parts: ";".join(k + sep + v for k, sep, v in parts))
connstr_inputs = st.one_of(any_text, structured_connstr, mutated(CONNSTR_SEEDS),
                           structured_connstr.map(lambda s: f"  {s};  "))


def _check_parsed(parsed: DeviceConnectionString | ServiceConnectionString) -> None:
    text = str(parsed)
    again = type(parsed).parse(text)
    assert again == parsed and str(again) == text
    assert parse_connection_string(text) == parsed
    key = parsed.shared_access_key
    if key:
        shown = repr(parsed)
        assert "SharedAccessKey=" not in shown
        visible = [v for v in (parsed.host_name, getattr(parsed, "device_id", ""),
                               getattr(parsed, "module_id", None) or "",
                               getattr(parsed, "gateway_host_name", None) or "",
                               getattr(parsed, "shared_access_key_name", ""))]
        if len(key) >= 8 and not any(key in v for v in visible):
            assert key not in shown
    if isinstance(parsed, DeviceConnectionString):
        assert parsed.resource_uri.startswith(f"{parsed.host_name}/devices/{parsed.device_id}")
        assert sum([parsed.shared_access_key is not None, parsed.x509,
                    parsed.shared_access_signature is not None]) == 1


def check_connstr(text: str) -> None:
    for parse in (parse_connection_string, DeviceConnectionString.parse, ServiceConnectionString.parse):
        try:
            parsed = parse(text)
        except ConnectionStringError as exc:
            assert isinstance(exc, BadRequest) and exc.http_status == 400 and exc.message
            continue
        _check_parsed(parsed)


HARNESSES = [
    Harness("sas.parse_token", sas_inputs, check_parse_token, seeds=SAS_SEEDS),
    Harness(
        "sas.build_round_trip",
        st.tuples(resources, st.integers(0, 10**15 - 1), st.none() | st.text(st.sampled_from(PRINTABLE),
                                                                           min_size=1, max_size=20)),
        check_build_round_trip,
    ),
    Harness("sas.scope_covers", st.tuples(scope_segments | any_text, scope_segments | any_text), check_scope),
    Harness("connstr.parse", connstr_inputs, check_connstr, seeds=CONNSTR_SEEDS),
]


@pytest.mark.parametrize("harness", HARNESSES, ids=[h.name for h in HARNESSES])
def test_harness_never_crashes(harness: Harness) -> None:
    assert harness.run(fuzz_examples(1000)) >= len(harness.seeds)


def test_corpus_is_present() -> None:
    assert len(SAS_SEEDS) >= 4 and len(CONNSTR_SEEDS) >= 4
    assert parse_token(SAS_SEEDS[0]).resource  # the captured SDK token (sorted first) still parses
