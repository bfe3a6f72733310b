"""Addresses, CBS audiences and SASL PLAIN user names in every form the Azure SDKs send."""

from __future__ import annotations

import pytest

from tether.protocols.amqp.addresses import Audience, node_path, parse_audience
from tether.protocols.amqp.auth import _PLAIN_USER, hub_names
from tether.protocols.amqp.nodes import default_table
from tether.protocols.amqp.performatives import Role


@pytest.mark.parametrize(("address", "path"), [
    ("/devices/d1/messages/events", "/devices/d1/messages/events"),
    ("devices/d1/messages/events/", "/devices/d1/messages/events"),
    ("amqps://hub.example:5671/messages/devicebound", "/messages/devicebound"),
    ("amqps://hub.example", "/"),
    ("$cbs", "$cbs"),
    ("", ""),
    (None, ""),
])
def test_node_paths(address: str | None, path: str) -> None:
    assert node_path(address) == path


@pytest.mark.parametrize(("audience", "expected"), [
    ("hub.example%2Fdevices%2Fdev%201", Audience("hub.example", "dev 1")),
    ("hub.example/devices/d1/modules/m1", Audience("hub.example", "d1", "m1")),
    ("hub.example", Audience("hub.example")),
    ("https://hub.example:8443", Audience("hub.example:8443")),
    ("sb://hub.example/hub1/ConsumerGroups/$Default/Partitions/0",
     Audience("hub.example", path="/hub1/ConsumerGroups/$Default/Partitions/0")),
])
def test_audiences(audience: str, expected: Audience) -> None:
    assert parse_audience(audience) == expected


@pytest.mark.parametrize(("user", "groups"), [
    ("dev1@sas.myhub", ("dev1", None, None, "myhub")),
    ("dev1/modules/m1@sas.myhub", ("dev1", "m1", None, "myhub")),
    ("iothubowner@sas.root.myhub", ("iothubowner", None, "root.", "myhub")),
    ("dev@x@sas.root.h.example.com", ("dev@x", None, "root.", "h.example.com")),
])
def test_plain_user_names(user: str, groups: tuple[str | None, ...]) -> None:
    match = _PLAIN_USER.match(user)
    assert match is not None and (match["id"], match["module"], match["root"], match["hub"]) == groups


def test_hub_names_accept_the_host_and_its_first_label() -> None:
    assert hub_names("MyHub.azure-devices.net") == {"myhub.azure-devices.net", "myhub"}
    assert "127.0.0.60" in hub_names("127.0.0.60")


@pytest.mark.parametrize(("address", "role", "name", "params"), [
    ("/devices/d1/messages/events", Role.RECEIVER, "telemetry", {"device": "d1"}),
    ("/devices/d1/modules/m%2F/messages/events", Role.RECEIVER, "telemetry",
     {"device": "d1", "module": "m/"}),
    ("/devices/d%3A1/messages/deviceBound", Role.SENDER, "c2d", {"device": "d:1"}),
    ("/devices/D1/METHODS/DEVICEBOUND", Role.SENDER, "method-requests", {"device": "D1"}),
    ("/devices/d1/twin", Role.RECEIVER, "twin-requests", {"device": "d1"}),
    ("/messages/deviceBound", Role.RECEIVER, "c2d-send", {}),
    ("/messages/serviceBound/feedback", Role.SENDER, "feedback", {}),
    ("$cbs", Role.SENDER, "cbs", {}),
])
def test_the_link_table_routes_by_address_and_role(address: str, role: Role, name: str,
                                                   params: dict[str, str]) -> None:
    match = default_table().match(node_path(address), role)
    assert match is not None and match.name == name and dict(match.params) == params


def test_an_address_with_the_wrong_role_or_unknown_has_no_route() -> None:
    table = default_table()
    assert table.match("/devices/d1/messages/events", Role.SENDER) is None
    assert table.match("/messages/serviceBound/feedback", Role.RECEIVER) is None
    assert table.match("/devices/d1/somewhere", Role.RECEIVER) is None
