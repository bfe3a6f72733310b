"""SAS tokens: Azure's exact format, both SDK encodings, strict parsing, scope and time rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import time
from urllib.parse import quote

import pytest
from azure.iot.device.common.auth.sastoken import (
    NonRenewableSasToken,
    RenewableSasToken,
    get_sastoken_info_from_string,
)
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
from azure.iot.hub.auth import ConnectionStringAuthentication
from azure.iot.hub.sastoken import SasToken as HubSdkSasToken
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.registry.models import DEVICE_ID_RE
from tether.security.sas import (
    MAX_TOKEN_LENGTH,
    SasError,
    SasToken,
    TokenVerifier,
    build_token,
    generate_key,
    parse_token,
    scope_covers,
    verify_signature,
)

# Captured from azure-iot-device 2.14 (see shared/design/azure-wire.md).
CAPTURED_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
CAPTURED_TOKEN = (
    "SharedAccessSignature sr=localhost%2Fdevices%2Fdev1"
    "&sig=VVWqmxbPMUEIbKav5a2cJpYL9j38xff0E1wt%2FMsscy8%3D&se=1795392981"
)
KEY = generate_key()
OTHER_KEY = generate_key()


def _sign(message: str, key: str) -> str:
    raw = hmac.new(base64.b64decode(key), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(raw).decode()


# Known vectors -------------------------------------------------------------------------------------
def test_captured_sdk_vector_verifies() -> None:
    token = parse_token(CAPTURED_TOKEN)
    assert token.resource == "localhost/devices/dev1"
    assert token.expiry == 1795392981
    assert token.policy_name is None
    assert verify_signature(token, [CAPTURED_KEY])
    assert not verify_signature(token, [KEY])


def test_build_token_reproduces_the_captured_vector_byte_for_byte() -> None:
    assert build_token("localhost/devices/dev1", CAPTURED_KEY, 1795392981) == CAPTURED_TOKEN


# azure-iot-device SDK ------------------------------------------------------------------------------
def test_device_sdk_renewable_token_verifies() -> None:
    signer = SymmetricKeySigningMechanism(KEY)
    sdk_token = RenewableSasToken("myhub.example.com/devices/dev-1", signer, ttl=3600)
    token = parse_token(str(sdk_token))
    assert token.resource == "myhub.example.com/devices/dev-1"
    assert token.expiry == sdk_token.expiry_time
    assert verify_signature(token, [KEY])


def test_device_sdk_module_token_with_unusual_id_characters_verifies() -> None:
    signer = SymmetricKeySigningMechanism(KEY)
    resource = "hub/devices/d$v(1)!*'@=,:/modules/m.o_d%2"
    token = parse_token(str(RenewableSasToken(resource, signer)))
    assert token.resource == resource
    assert verify_signature(token, [KEY])


def test_device_sdk_token_with_key_name_carries_skn() -> None:
    signer = SymmetricKeySigningMechanism(KEY)
    token = parse_token(str(RenewableSasToken("hub/devices/dev1", signer, key_name="device")))
    assert token.policy_name == "device"
    assert verify_signature(token, [KEY])


def test_our_token_is_accepted_by_the_device_sdk_parser() -> None:
    ours = build_token("localhost/devices/dev1", KEY, 1_900_000_000, policy_name="device")
    sdk = NonRenewableSasToken(ours)
    assert sdk.resource_uri == "localhost/devices/dev1"
    assert sdk.expiry_time == 1_900_000_000
    assert set(get_sastoken_info_from_string(ours)) == {"sr", "sig", "se", "skn"}


# azure-iot-hub SDK ---------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["localhost", "localhost:8443", "MyHub.Azure-Devices.net"])
def test_service_sdk_policy_token_verifies(host: str) -> None:
    token = parse_token(str(HubSdkSasToken(host, KEY, "iothubowner")))
    assert token.resource == host
    assert token.policy_name == "iothubowner"
    assert verify_signature(token, [KEY])


def test_service_sdk_connection_string_authentication_header_verifies() -> None:
    auth = ConnectionStringAuthentication(
        f"HostName=localhost:8443;SharedAccessKeyName=registryReadWrite;SharedAccessKey={KEY}"
    )
    header = auth.signed_session().headers[auth.header]
    token = parse_token(header)
    assert token.resource == "localhost:8443"
    assert token.policy_name == "registryReadWrite"
    assert verify_signature(token, [OTHER_KEY, KEY])


def test_service_sdk_signature_with_raw_slash_is_accepted() -> None:
    """azure-iot-hub encodes sig with quote(), which leaves '/' unescaped."""
    for ttl in range(3600, 4600):
        text = str(HubSdkSasToken("localhost", KEY, "service", ttl=ttl))
        if "/" in text.split("&sig=", 1)[1].split("&", 1)[0]:
            break
    else:
        pytest.fail("no signature containing '/' in 1000 tries")
    assert verify_signature(parse_token(text), [KEY])


# Encodings and layout ------------------------------------------------------------------------------
def test_field_order_is_free() -> None:
    fields = build_token("hub/devices/dev1", KEY, 1_900_000_000, "device")[len("SharedAccessSignature ") :]
    for order in itertools.permutations(fields.split("&")):
        token = parse_token("SharedAccessSignature " + "&".join(order))
        assert token.policy_name == "device"
        assert verify_signature(token, [KEY])


def test_lowercase_and_unencoded_slash_in_sr_are_accepted() -> None:
    sig = _sign("hub%2Fdevices%2Fdev1\n1900000000", KEY)
    for sr in ("hub/devices/dev1", "hub%2fdevices%2fdev1", "hub%2Fdevices/dev1"):
        token = parse_token(f"SharedAccessSignature sr={sr}&sig={quote(sig, safe='')}&se=1900000000")
        assert token.resource == "hub/devices/dev1"
        assert verify_signature(token, [KEY])


def test_signature_over_the_sr_text_as_sent_is_accepted() -> None:
    """Encoders like .NET WebUtility.UrlEncode leave ( ) unescaped and sign that text."""
    sr = "hub%2Fdevices%2Fdev(1)"
    sig = _sign(f"{sr}\n1900000000", KEY)
    token = parse_token(f"SharedAccessSignature sr={sr}&sig={quote(sig, safe='')}&se=1900000000")
    assert token.resource == "hub/devices/dev(1)"
    assert verify_signature(token, [KEY])
    assert not verify_signature(token, [OTHER_KEY])


def test_secondary_key_verifies_and_empty_or_invalid_keys_are_skipped() -> None:
    token = parse_token(build_token("hub/devices/dev1", KEY, 1_900_000_000))
    assert verify_signature(token, [OTHER_KEY, KEY])
    assert verify_signature(token, [None, "", "not base64!", KEY])
    assert not verify_signature(token, [None, "", OTHER_KEY])
    assert not verify_signature(token, [])


def test_token_repr_does_not_show_the_signature() -> None:
    token = parse_token(CAPTURED_TOKEN)
    assert base64.b64encode(token.signature).decode() not in repr(token)


def test_generate_key_is_32_random_bytes() -> None:
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(len(base64.b64decode(k, validate=True)) == 32 for k in keys)


# Strict parsing --------------------------------------------------------------------------------------
GOOD_SIG = quote(_sign("hub%2Fdevices%2Fdev1\n1900000000", KEY), safe="")
MALFORMED = {
    "empty": "",
    "prefix only": "SharedAccessSignature ",
    "wrong prefix": f"SharedAccessSig sr=hub&sig={GOOD_SIG}&se=1900000000",
    "lowercase prefix": f"sharedaccesssignature sr=hub&sig={GOOD_SIG}&se=1900000000",
    "no space": f"SharedAccessSignaturesr=hub&sig={GOOD_SIG}&se=1900000000",
    "missing sr": f"SharedAccessSignature sig={GOOD_SIG}&se=1900000000",
    "missing sig": "SharedAccessSignature sr=hub&se=1900000000",
    "missing se": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}",
    "duplicated sr": f"SharedAccessSignature sr=hub&sr=hub&sig={GOOD_SIG}&se=1900000000",
    "duplicated skn": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000&skn=a&skn=b",
    "unknown field": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000&st=1",
    "uppercase field": f"SharedAccessSignature SR=hub&sig={GOOD_SIG}&se=1900000000",
    "field without =": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000&skn",
    "trailing &": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000&",
    "empty sr": f"SharedAccessSignature sr=&sig={GOOD_SIG}&se=1900000000",
    "empty sig": "SharedAccessSignature sr=hub&sig=&se=1900000000",
    "empty skn": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000&skn=",
    "negative se": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=-5",
    "float se": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000.5",
    "hex se": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=0x10",
    "huge se": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se={'9' * 40}",
    "non-base64 sig": "SharedAccessSignature sr=hub&sig=not*base64!&se=1900000000",
    "short sig": f"SharedAccessSignature sr=hub&sig={quote(base64.b64encode(b'abc'))}&se=1900000000",
    "non-ascii raw": f"SharedAccessSignature sr=hüb&sig={GOOD_SIG}&se=1900000000",
    "non-ascii encoded": f"SharedAccessSignature sr=h%C3%BCb&sig={GOOD_SIG}&se=1900000000",
    "invalid utf8": f"SharedAccessSignature sr=h%FFb&sig={GOOD_SIG}&se=1900000000",
    "control char": f"SharedAccessSignature sr=hub%0A&sig={GOOD_SIG}&se=1900000000",
    "space in sr": f"SharedAccessSignature sr=h%20ub&sig={GOOD_SIG}&se=1900000000",
    "newline raw": f"SharedAccessSignature sr=hub\n&sig={GOOD_SIG}&se=1900000000",
    "nul": f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1900000000\x00",
    "garbage": "\x00\xff\ufffd💥 SharedAccessSignature",
    "oversize": f"SharedAccessSignature sr={'a' * MAX_TOKEN_LENGTH}&sig={GOOD_SIG}&se=1900000000",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(SasError) as info:
        parse_token(text)
    assert info.value.reason == "malformed"
    assert GOOD_SIG not in str(info.value)


def test_token_of_exactly_4k_is_accepted_and_one_more_byte_is_not() -> None:
    base = build_token("hub/devices/dev1", KEY, 1_900_000_000, policy_name="p")
    padded = base + "x" * (MAX_TOKEN_LENGTH - len(base))
    assert parse_token(padded).policy_name == "p" + "x" * (MAX_TOKEN_LENGTH - len(base))
    with pytest.raises(SasError):
        parse_token(padded + "x")


# Scope ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token_resource", "target", "covered"),
    [
        ("hub/devices/dev1", "hub/devices/dev1", True),
        ("hub/devices/dev1/", "hub/devices/dev1", True),
        ("hub/devices/dev1", "hub/devices/dev1/", True),
        ("hub/devices/dev1", "hub/devices/dev1/modules/m1", True),
        ("hub", "hub/devices/dev1", True),
        ("hub", "hub", True),
        ("HUB.Example.COM/devices/dev1", "hub.example.com/devices/dev1", True),
        ("hub/devices/ab", "hub/devices/abc", False),
        ("hub/devices/abc", "hub/devices/ab", False),
        ("hub/devices/dev1", "hub/devices/DEV1", False),
        ("hub/Devices/dev1", "hub/devices/dev1", False),
        ("hub/devices/dev1/modules/m1", "hub/devices/dev1", False),
        ("hub/devices/dev2", "hub/devices/dev1", False),
        ("hub2", "hub/devices/dev1", False),
        ("hu", "hub", False),
        ("hub/devices", "hub/devices/dev1", True),
        ("hub//devices/dev1", "hub/devices/dev1", False),
        ("hub/devices/..", "hub/devices/dev1", False),
        ("hub/devices/..", "hub/devices/..", True),
        ("hub/devices/dev1//", "hub/devices/dev1", False),
        ("", "hub", False),
    ],
)
def test_scope_covers(token_resource: str, target: str, covered: bool) -> None:
    assert scope_covers(token_resource, target) is covered


# Time rules ----------------------------------------------------------------------------------------
NOW = 1_800_000_000.0


def _token(expiry: int) -> SasToken:
    return parse_token(build_token("hub/devices/dev1", KEY, expiry))


def test_expiry_honours_clock_skew() -> None:
    verifier = TokenVerifier(clock_skew_s=300, now=lambda: NOW)
    verifier.verify(_token(int(NOW) - 300), [KEY])  # just inside the skew
    with pytest.raises(SasError) as info:
        verifier.verify(_token(int(NOW) - 301), [KEY])
    assert info.value.reason == "expired"
    strict = TokenVerifier(clock_skew_s=0, now=lambda: NOW)
    with pytest.raises(SasError, match="expired"):
        strict.check_time(_token(int(NOW) - 1))


def test_expiry_beyond_max_lifetime_is_refused() -> None:
    verifier = TokenVerifier(clock_skew_s=300, max_lifetime_s=86_400, now=lambda: NOW)
    verifier.check_time(_token(int(NOW) + 86_400 + 300))
    with pytest.raises(SasError) as info:
        verifier.check_time(_token(int(NOW) + 86_400 + 301))
    assert info.value.reason == "lifetime-too-long"


def test_default_max_lifetime_is_one_year_plus_skew() -> None:
    verifier = TokenVerifier(now=lambda: NOW)
    verifier.check_time(_token(int(NOW) + 365 * 86_400 + 300))
    with pytest.raises(SasError, match="lifetime-too-long"):
        verifier.check_time(_token(int(NOW) + 365 * 86_400 + 301))


def test_bad_signature_is_reported_after_time_checks() -> None:
    verifier = TokenVerifier(now=lambda: NOW)
    with pytest.raises(SasError) as info:
        verifier.verify(_token(int(NOW) + 60), [OTHER_KEY])
    assert info.value.reason == "bad-signature"


def test_verifier_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(clock_skew_s=-1)
    with pytest.raises(ValueError):
        TokenVerifier(max_lifetime_s=0)


def test_real_clock_accepts_a_fresh_sdk_token() -> None:
    sdk = RenewableSasToken("hub/devices/dev1", SymmetricKeySigningMechanism(KEY), ttl=3600)
    TokenVerifier().verify(parse_token(str(sdk)), [KEY])
    assert sdk.expiry_time > time.time()


# Properties ----------------------------------------------------------------------------------------
TOKENISH = st.text(alphabet=st.sampled_from(list("SharedAccessSignature srigekn=&%2F3Dab+/09\x00é")))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), TOKENISH, TOKENISH.map(lambda s: "SharedAccessSignature " + s)))
def test_parse_token_raises_only_sas_error(text: str) -> None:
    try:
        parse_token(text)
    except SasError as exc:
        assert exc.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(
    host=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}(:[0-9]{1,5})?", fullmatch=True),
    device_id=st.from_regex(DEVICE_ID_RE, fullmatch=True),
    module_id=st.none() | st.from_regex(DEVICE_ID_RE, fullmatch=True),
    raw_key=st.binary(min_size=16, max_size=64),
    expiry=st.integers(min_value=0, max_value=10**12),
    policy=st.none() | st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
)
def test_build_parse_verify_round_trip(
    host: str,
    device_id: str,
    module_id: str | None,
    raw_key: bytes,
    expiry: int,
    policy: str | None,
) -> None:
    key = base64.b64encode(raw_key).decode()
    resource = f"{host}/devices/{device_id}" + (f"/modules/{module_id}" if module_id else "")
    text = build_token(resource, key, expiry, policy)
    token = parse_token(text)
    assert (token.resource, token.expiry, token.policy_name) == (resource, expiry, policy)
    assert verify_signature(token, [key])
    assert scope_covers(token.resource, resource)
    assert scope_covers(f"{host}/devices/{device_id}", token.resource)
    # The device SDK's own parser reads our tokens.
    assert NonRenewableSasToken(text).resource_uri == resource
