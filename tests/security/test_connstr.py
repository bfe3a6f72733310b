"""Connection strings: the SDKs' grammar, strict errors, round trips, keys kept out of repr()."""

from __future__ import annotations

import base64

import pytest
from azure.iot.device.common.auth.connection_string import ConnectionString as DeviceSdkConnectionString
from azure.iot.hub.connection_string import ConnectionString as HubSdkConnectionString
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import BadRequest
from tether.registry.models import DEVICE_ID_RE
from tether.security.connstr import (
    ConnectionStringError,
    DeviceConnectionString,
    ServiceConnectionString,
    parse_connection_string,
)
from tether.security.sas import generate_key

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # ends in '=': split on the first '=' only


def test_device_connection_string_with_key() -> None:
    cs = DeviceConnectionString.parse(f"HostName=hub.example.com;DeviceId=dev1;SharedAccessKey={KEY}")
    assert cs.host_name == "hub.example.com"
    assert cs.device_id == "dev1"
    assert cs.shared_access_key == KEY
    assert cs.module_id is None and not cs.x509 and cs.gateway_host_name is None
    assert cs.resource_uri == "hub.example.com/devices/dev1"


def test_field_order_is_free() -> None:
    cs = DeviceConnectionString.parse(f"SharedAccessKey={KEY};DeviceId=dev1;HostName=hub")
    assert (cs.host_name, cs.device_id, cs.shared_access_key) == ("hub", "dev1", KEY)


def test_module_x509_and_gateway() -> None:
    cs = DeviceConnectionString.parse("HostName=hub;DeviceId=dev1;ModuleId=m1;x509=true;GatewayHostName=edge")
    assert cs.module_id == "m1" and cs.x509 and cs.shared_access_key is None
    assert cs.gateway_host_name == "edge"
    assert cs.resource_uri == "hub/devices/dev1/modules/m1"
    assert DeviceConnectionString.parse("HostName=hub;DeviceId=dev1;x509=TRUE").x509


def test_shared_access_signature_credential_keeps_its_equals_signs() -> None:
    sas = "SharedAccessSignature sr=hub%2Fdevices%2Fdev1&sig=abc%3D&se=1"
    cs = DeviceConnectionString.parse(f"HostName=hub;DeviceId=dev1;SharedAccessSignature={sas}")
    assert cs.shared_access_signature == sas
    assert str(cs) == f"HostName=hub;DeviceId=dev1;SharedAccessSignature={sas}"


def test_host_with_port_and_ip_hosts() -> None:
    assert ServiceConnectionString.parse(
        f"HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
    ).host_name == ("localhost:8443")
    assert DeviceConnectionString.parse(f"HostName=127.0.0.2;DeviceId=d;SharedAccessKey={KEY}").host_name == (
        "127.0.0.2"
    )
    assert DeviceConnectionString.parse(f"HostName=[::1]:443;DeviceId=d;SharedAccessKey={KEY}")


def test_service_connection_string() -> None:
    cs = ServiceConnectionString.parse(f"HostName=hub;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}")
    assert (cs.host_name, cs.shared_access_key_name, cs.shared_access_key) == ("hub", "iothubowner", KEY)
    assert str(cs) == f"HostName=hub;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"


def test_surrounding_whitespace_is_ignored() -> None:
    cs = DeviceConnectionString.parse(f"  HostName=hub;DeviceId=dev1;SharedAccessKey={KEY}\n")
    assert cs.shared_access_key == KEY


def test_parse_connection_string_picks_the_kind() -> None:
    assert isinstance(
        parse_connection_string(f"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}"),
        ServiceConnectionString,
    )
    assert isinstance(
        parse_connection_string(f"HostName=h;DeviceId=d;SharedAccessKey={KEY}"), DeviceConnectionString
    )
    with pytest.raises(ConnectionStringError):
        parse_connection_string(f"HostName=h;SharedAccessKey={KEY}")


def test_keys_never_appear_in_repr() -> None:
    device = DeviceConnectionString.parse(f"HostName=h;DeviceId=d;SharedAccessKey={KEY}")
    service = ServiceConnectionString.parse(f"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}")
    assert KEY not in repr(device) and KEY not in repr(service)
    assert KEY in str(device) and KEY in str(service)


def test_dataclasses_are_frozen() -> None:
    cs = DeviceConnectionString(host_name="h", device_id="d", shared_access_key=KEY)
    with pytest.raises(AttributeError):
        cs.device_id = "other"  # type: ignore[misc]


def test_errors_are_bad_requests() -> None:
    with pytest.raises(BadRequest) as info:
        DeviceConnectionString.parse("HostName=h")
    assert info.value.http_status == 400


BAD_DEVICE = {
    "empty": "",
    "blank": "   ",
    "no equals": "HostName=h;DeviceId=d;SharedAccessKey",
    "empty key name": f"HostName=h;DeviceId=d;={KEY}",
    "empty segment": f"HostName=h;;DeviceId=d;SharedAccessKey={KEY}",
    "trailing semicolon": f"HostName=h;DeviceId=d;SharedAccessKey={KEY};",
    "unknown key": f"HostName=h;DeviceId=d;SharedAccessKey={KEY};Foo=bar",
    "wrong case key": f"hostname=h;DeviceId=d;SharedAccessKey={KEY}",
    "duplicate key": f"HostName=h;HostName=h;DeviceId=d;SharedAccessKey={KEY}",
    "duplicate device": f"HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey={KEY}",
    "empty value": f"HostName=;DeviceId=d;SharedAccessKey={KEY}",
    "missing host": f"DeviceId=d;SharedAccessKey={KEY}",
    "missing device": f"HostName=h;SharedAccessKey={KEY}",
    "no credential": "HostName=h;DeviceId=d",
    "key and x509": f"HostName=h;DeviceId=d;SharedAccessKey={KEY};x509=true",
    "key and sas": f"HostName=h;DeviceId=d;SharedAccessKey={KEY};SharedAccessSignature=x",
    "x509 false": "HostName=h;DeviceId=d;x509=false",
    "key not base64": "HostName=h;DeviceId=d;SharedAccessKey=not base64!",
    "bad device id": f"HostName=h;DeviceId=a/b;SharedAccessKey={KEY}",
    "bad module id": f"HostName=h;DeviceId=d;ModuleId=m#1;SharedAccessKey={KEY}",
    "host with path": f"HostName=h/x;DeviceId=d;SharedAccessKey={KEY}",
    "host with space": f"HostName=h x;DeviceId=d;SharedAccessKey={KEY}",
    "bad gateway": f"HostName=h;DeviceId=d;SharedAccessKey={KEY};GatewayHostName=a b",
    "policy in device": f"HostName=h;DeviceId=d;SharedAccessKeyName=p;SharedAccessKey={KEY}",
}


@pytest.mark.parametrize("text", BAD_DEVICE.values(), ids=BAD_DEVICE.keys())
def test_bad_device_connection_strings(text: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        DeviceConnectionString.parse(text)
    assert KEY not in str(info.value)


BAD_SERVICE = {
    "missing key name": f"HostName=h;SharedAccessKey={KEY}",
    "missing key": "HostName=h;SharedAccessKeyName=p",
    "missing host": f"SharedAccessKeyName=p;SharedAccessKey={KEY}",
    "device id in service": f"HostName=h;DeviceId=d;SharedAccessKeyName=p;SharedAccessKey={KEY}",
    "duplicate key name": f"HostName=h;SharedAccessKeyName=p;SharedAccessKeyName=q;SharedAccessKey={KEY}",
    "bad policy name": f"HostName=h;SharedAccessKeyName=p q;SharedAccessKey={KEY}",
    "bad key": "HostName=h;SharedAccessKeyName=p;SharedAccessKey=%%%",
}


@pytest.mark.parametrize("text", BAD_SERVICE.values(), ids=BAD_SERVICE.keys())
def test_bad_service_connection_strings(text: str) -> None:
    with pytest.raises(ConnectionStringError):
        ServiceConnectionString.parse(text)


def test_our_strings_are_accepted_by_the_sdk_parsers() -> None:
    device = DeviceConnectionString(
        host_name="hub", device_id="dev1", shared_access_key=KEY, module_id="m1", gateway_host_name="edge"
    )
    sdk_device = DeviceSdkConnectionString(str(device))
    assert sdk_device["HostName"] == "hub"
    assert sdk_device["DeviceId"] == "dev1"
    assert sdk_device["ModuleId"] == "m1"
    assert sdk_device["SharedAccessKey"] == KEY
    assert sdk_device["GatewayHostName"] == "edge"
    assert DeviceSdkConnectionString(str(DeviceConnectionString("hub", "dev1", x509=True)))["x509"] == "true"
    service = ServiceConnectionString("localhost:8443", "iothubowner", KEY)
    sdk_service = HubSdkConnectionString(str(service))
    assert sdk_service["SharedAccessKeyName"] == "iothubowner"
    assert sdk_service["SharedAccessKey"] == KEY


@settings(max_examples=150, deadline=None)
@given(
    host=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,40}(:[0-9]{1,5})?", fullmatch=True),
    device_id=st.from_regex(DEVICE_ID_RE, fullmatch=True),
    module_id=st.none() | st.from_regex(DEVICE_ID_RE, fullmatch=True),
    raw_key=st.none() | st.binary(min_size=16, max_size=64),
    gateway=st.none() | st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
)
def test_device_round_trip(
    host: str, device_id: str, module_id: str | None, raw_key: bytes | None, gateway: str | None
) -> None:
    key = base64.b64encode(raw_key).decode() if raw_key is not None else None
    cs = DeviceConnectionString(
        host_name=host,
        device_id=device_id,
        shared_access_key=key,
        module_id=module_id,
        x509=key is None,
        gateway_host_name=gateway,
    )
    assert DeviceConnectionString.parse(str(cs)) == cs
    assert parse_connection_string(str(cs)) == cs


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parser_raises_only_connection_string_errors(text: str) -> None:
    try:
        parse_connection_string(text)
    except ConnectionStringError:
        pass


def test_generated_keys_round_trip() -> None:
    key = generate_key()
    cs = ServiceConnectionString.parse(f"HostName=h;SharedAccessKeyName=service;SharedAccessKey={key}")
    assert cs.shared_access_key == key
