"""The Authenticator: every refusal has a reason, exactly one audit record and one increment of
`tether_auth_failures{surface,reason}`; SDK tokens pass.

The registry, policy and audit services are replaced by tiny in-memory fakes of the lookup
protocols (the real services are tested with their own storage elsewhere).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import pytest
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
from azure.iot.hub.auth import ConnectionStringAuthentication
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.observability.metrics import REGISTRY
from tether.registry.models import Device
from tether.security.authenticator import Authenticator
from tether.security.principal import (
    AuthRefused,
    CredentialKind,
    Permission,
    Principal,
    PrincipalKind,
    public_reason,
)
from tether.security.sas import build_token, generate_key, parse_token
from tether.storage.base import PolicyRecord

HOST = "localhost"
NOW = 1_800_000_000
LATER = NOW + 3600
K1, K2, K3 = generate_key(), generate_key(), generate_key()
PK = {name: (generate_key(), generate_key()) for name in ("iothubowner", "service", "device", "rr", "rrw")}


class FakeDevices:
    def __init__(self, devices: Sequence[Device]) -> None:
        self.items = {d.device_id: d for d in devices}
        self.fail = False

    async def find(self, device_id: str) -> Device | None:
        if self.fail:
            raise RuntimeError("database is down")
        return self.items.get(device_id)


class FakeModules:
    def __init__(self, modules: dict[tuple[str, str], Device]) -> None:
        self.items = modules

    async def find_module(self, device_id: str, module_id: str) -> Device | None:
        return self.items.get((device_id, module_id))


class FakePolicies:
    def __init__(self, policies: Sequence[PolicyRecord]) -> None:
        self.items = {p.name: p for p in policies}

    async def find(self, name: str) -> PolicyRecord | None:
        return self.items.get(name)


class FakeAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def record(
        self,
        action: str,
        outcome: str,
        *,
        principal: str | None = None,
        credential: str | None = None,
        reason: str | None = None,
        peer: str | None = None,
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.records.append(
            {
                "action": action,
                "outcome": outcome,
                "principal": principal,
                "credential": credential,
                "reason": reason,
                "peer": peer,
                "target": target,
                "details": details,
            }
        )


class ThumbprintVerifier:
    """A real (if minimal) selfSigned check: SHA-1 thumbprint of the leaf."""

    async def verify(self, device: Device, chain: Sequence[x509.Certificate]) -> CredentialKind:
        thumb = chain[0].fingerprint(hashes.SHA1()).hex().upper()
        prints = device.authentication.x509_thumbprint
        if thumb not in {(t or "").upper() for t in (prints.primary_thumbprint, prints.secondary_thumbprint)}:
            raise AuthRefused("thumbprint-mismatch", "certificate does not match the device")
        return CredentialKind.x509_self_signed


def _cert(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


CERT, OTHER_CERT = _cert("cam1"), _cert("intruder")


def _device(device_id: str, *, status: str = "enabled", auth: dict[str, Any] | None = None) -> Device:
    authentication = auth or {"type": "sas", "symmetricKey": {"primaryKey": K1, "secondaryKey": K2}}
    return Device.model_validate({"deviceId": device_id, "status": status, "authentication": authentication})


def failures(surface: str, reason: str) -> float:
    """Current `tether_auth_failures_total` sample (the registry is process-wide: compare deltas), under
    the public label of `reason` (reasons revealing whether an identity exists share one)."""
    labels = {"surface": surface, "reason": public_reason(reason)}
    value = REGISTRY.get_sample_value("tether_auth_failures_total", labels)
    return value or 0.0


def _policy(name: str, *perms: Permission) -> PolicyRecord:
    return PolicyRecord(name, PK[name][0], PK[name][1], frozenset(p.value for p in perms))


class Hub:
    def __init__(self, now: Callable[[], float] = lambda: float(NOW), with_modules: bool = True) -> None:
        thumb = CERT.fingerprint(hashes.SHA1()).hex().upper()
        self.devices = FakeDevices(
            [
                _device("dev1"),
                _device("dev2"),
                _device("ab"),
                _device("abc"),
                _device("off", status="disabled"),
                _device("cam1", auth={"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumb}}),
                _device("camoff", status="disabled", auth={"type": "selfSigned"}),
            ]
        )
        self.policies = FakePolicies(
            [
                _policy("iothubowner", *Permission),
                _policy("service", Permission.service_connect),
                _policy("device", Permission.device_connect),
                _policy("rr", Permission.registry_read),
                _policy("rrw", Permission.registry_read, Permission.registry_write),
            ]
        )
        self.audit = FakeAudit()
        module = _device("dev1", auth={"type": "sas", "symmetricKey": {"primaryKey": K3}})
        sibling = _device("dev1", auth={"type": "sas", "symmetricKey": {"primaryKey": K2}})
        self.auth = Authenticator(
            hostname=HOST,
            devices=self.devices,
            policies=self.policies,
            audit=self.audit,
            now=now,
            cert_verifier=ThumbprintVerifier(),
            modules=FakeModules({("dev1", "m1"): module, ("dev1", "m2"): sibling}) if with_modules else None,
        )

    def one_record(self, outcome: str) -> dict[str, Any]:
        assert len(self.audit.records) == 1, self.audit.records
        record = self.audit.records[0]
        assert record["outcome"] == outcome
        return record


@pytest.fixture
def hub() -> Hub:
    return Hub()


def tok(
    resource: str = f"{HOST}/devices/dev1", key: str = K1, se: int = LATER, skn: str | None = None
) -> str:
    return build_token(resource, key, se, skn)


def svc(policy: str = "iothubowner", key: str | None = None, resource: str = HOST) -> str:
    return build_token(resource, key or PK[policy][0], LATER, policy)


def _fields(token: str) -> list[str]:
    return token[len("SharedAccessSignature ") :].split("&")


def _join(fields: Sequence[str]) -> str:
    return "SharedAccessSignature " + "&".join(fields)


def _tamper(token: str) -> str:
    parsed = parse_token(token)
    flipped = bytes([parsed.signature[0] ^ 1]) + parsed.signature[1:]
    sig = quote(base64.b64encode(flipped).decode(), safe="")
    return f"SharedAccessSignature sr={quote(parsed.resource, safe='')}&sig={sig}&se={parsed.expiry}"


# Negative device-SAS cases: (token, device id, module id, reason, 403?) ------------------------------
DEVICE_REFUSALS: dict[str, tuple[str, str, str | None, str, bool]] = {
    "expired": (tok(se=NOW - 301), "dev1", None, "expired", False),
    "future beyond max lifetime": (tok(se=NOW + 366 * 86_400), "dev1", None, "lifetime-too-long", False),
    "tampered signature": (_tamper(tok()), "dev1", None, "bad-signature", False),
    "wrong key": (tok(key=K3), "dev1", None, "bad-signature", False),
    "token of another device": (tok(f"{HOST}/devices/dev2"), "dev1", None, "wrong-scope", False),
    "sibling prefix ab vs abc": (tok(f"{HOST}/devices/ab"), "abc", None, "wrong-scope", False),
    "device key at hub level": (tok(HOST), "dev1", None, "wrong-scope", False),
    "missing sr": (_join(_fields(tok())[1:]), "dev1", None, "malformed", False),
    "missing sig": (_join([_fields(tok())[0], _fields(tok())[2]]), "dev1", None, "malformed", False),
    "missing se": (_join(_fields(tok())[:2]), "dev1", None, "malformed", False),
    "duplicated field": (tok() + f"&se={LATER}", "dev1", None, "malformed", False),
    "unknown field": (tok() + "&st=1", "dev1", None, "malformed", False),
    "negative se": (_join([*_fields(tok())[:2], "se=-1"]), "dev1", None, "malformed", False),
    "wrong prefix": (tok().replace("SharedAccessSignature", "Bearer"), "dev1", None, "malformed", False),
    "non-ascii garbage": (
        "SharedAccessSignature sr=\u00e9\u2603&sig=\x00&se=1",
        "dev1",
        None,
        "malformed",
        False,
    ),
    "oversize": (tok() + "&skn=" + "p" * 5000, "dev1", None, "malformed", False),
    "empty token": ("", "dev1", None, "missing-credentials", False),
    "wrong hub host": (tok("otherhub/devices/dev1"), "dev1", None, "wrong-hub", False),
    "unknown policy": (tok(key=K1, skn="nope"), "dev1", None, "unknown-policy", False),
    "policy with wrong key": (tok(key=K1, skn="device"), "dev1", None, "bad-signature", False),
    "policy without DeviceConnect": (
        tok(key=PK["service"][0], skn="service"),
        "dev1",
        None,
        "missing-permission",
        True,
    ),
    "disabled device": (tok(f"{HOST}/devices/off"), "off", None, "device-disabled", False),
    "disabled device via policy": (
        tok(f"{HOST}/devices/off", PK["device"][0], skn="device"),
        "off",
        None,
        "device-disabled",
        False,
    ),
    "unknown device": (tok(f"{HOST}/devices/ghost"), "ghost", None, "unknown-device", False),
    "invalid device id": (tok(), "dev/1", None, "unknown-device", False),
    "x509 device with sas": (tok(f"{HOST}/devices/cam1"), "cam1", None, "wrong-auth-type", False),
    "device key for module": (tok(f"{HOST}/devices/dev1/modules/m1"), "dev1", "m1", "bad-signature", False),
    "unknown module": (tok(f"{HOST}/devices/dev1/modules/m9", K3), "dev1", "m9", "unknown-module", False),
    "device token for module": (tok(f"{HOST}/devices/dev1"), "dev1", "m1", "wrong-scope", False),
    "device-scoped token with the module key": (tok(f"{HOST}/devices/dev1", K3), "dev1", "m1", "wrong-scope",
                                                False),
    "another module's token": (tok(f"{HOST}/devices/dev1/modules/m2", K2), "dev1", "m1", "wrong-scope",
                               False),
    "module token of another device": (tok(f"{HOST}/devices/dev2/modules/m1", K3), "dev1", "m1",
                                       "wrong-scope", False),
    "module id prefix m1 vs m10": (tok(f"{HOST}/devices/dev1/modules/m1", K3), "dev1", "m10", "wrong-scope",
                                   False),
    "module token for device": (
        tok(f"{HOST}/devices/dev1/modules/m1", K3),
        "dev1",
        None,
        "wrong-scope",
        False,
    ),
}


@pytest.mark.parametrize(
    ("token", "device_id", "module_id", "reason", "forbidden"),
    DEVICE_REFUSALS.values(),
    ids=DEVICE_REFUSALS.keys(),
)
async def test_device_sas_refusals(
    hub: Hub, token: str, device_id: str, module_id: str | None, reason: str, forbidden: bool
) -> None:
    before = failures("mqtt", reason)
    with pytest.raises(AuthRefused) as info:
        await hub.auth.device_sas(token, device_id, module_id, surface="mqtt", peer="127.0.0.1:5555")
    assert info.value.reason == reason
    assert failures("mqtt", reason) == before + 1
    assert info.value.not_authorized is forbidden
    record = hub.one_record("refused")
    assert record["action"] == "auth.mqtt"
    assert record["reason"] == reason
    assert record["peer"] == "127.0.0.1:5555"
    assert record["target"] == device_id
    assert record["principal"].startswith(f"device:{device_id}")
    _assert_no_secrets(hub, token)


SERVICE_REFUSALS: dict[str, tuple[str | None, Permission, str, bool]] = {
    "missing header": (None, Permission.registry_read, "missing-credentials", False),
    "empty header": ("", Permission.registry_read, "missing-credentials", False),
    "device token as service token": (tok(HOST), Permission.registry_read, "device-token-not-allowed", False),
    "device-scoped policy token": (
        svc(resource=f"{HOST}/devices/dev1"),
        Permission.registry_read,
        "wrong-scope",
        False,
    ),
    "policy missing permission": (svc("rr"), Permission.registry_write, "missing-permission", True),
    "device policy for registry": (svc("device"), Permission.registry_read, "missing-permission", True),
    "unknown policy": (
        build_token(HOST, K1, LATER, "ghost"),
        Permission.registry_read,
        "unknown-policy",
        False,
    ),
    "wrong policy key": (svc("rr", key=PK["rrw"][0]), Permission.registry_read, "bad-signature", False),
    "other hub": (svc(resource="evil.example.com"), Permission.registry_read, "wrong-hub", False),
    "expired": (build_token(HOST, PK["rr"][0], NOW - 400, "rr"), Permission.registry_read, "expired", False),
    "bearer token": ("Bearer abc.def.ghi", Permission.registry_read, "malformed", False),
}


@pytest.mark.parametrize(
    ("header", "required", "reason", "forbidden"), SERVICE_REFUSALS.values(), ids=SERVICE_REFUSALS.keys()
)
async def test_service_refusals(
    hub: Hub, header: str | None, required: Permission, reason: str, forbidden: bool
) -> None:
    before = failures("rest", reason)
    with pytest.raises(AuthRefused) as info:
        await hub.auth.service(header, required=required, surface="rest", peer="10.0.0.1:1")
    assert (info.value.reason, info.value.not_authorized) == (reason, forbidden)
    assert failures("rest", reason) == before + 1
    record = hub.one_record("refused")
    assert (record["action"], record["reason"], record["peer"]) == ("auth.rest", reason, "10.0.0.1:1")
    _assert_no_secrets(hub, header or "")


def _assert_no_secrets(hub: Hub, token: str) -> None:
    text = repr(hub.audit.records)
    for secret in (K1, K2, K3, *(k for pair in PK.values() for k in pair)):
        assert secret not in text
    if "sig=" in token:
        assert token.split("sig=")[1].split("&")[0] not in text


# Positive device cases -----------------------------------------------------------------------------
async def _allowed(hub: Hub, token: str, device_id: str = "dev1", module_id: str | None = None) -> Principal:
    before = _all_failures()
    principal = await hub.auth.device_sas(token, device_id, module_id, surface="mqtt", peer="p")
    assert _all_failures() == before  # an accepted credential is no failure
    record = hub.one_record("allowed")
    assert record["principal"] == principal.name and record["reason"] is None
    assert record["credential"] == principal.credential.value
    _assert_no_secrets(hub, token)
    return principal


async def test_primary_key_token_gives_a_device_principal(hub: Hub) -> None:
    p = await _allowed(hub, tok())
    assert (p.kind, p.credential, p.device_id, p.module_id) == (
        PrincipalKind.device,
        CredentialKind.device_key,
        "dev1",
        None,
    )
    assert p.expires_at == LATER
    assert p.has(Permission.device_connect) and not p.has(Permission.registry_read)
    assert p.name == "device:dev1"


async def test_secondary_key_is_accepted_for_rotation(hub: Hub) -> None:
    assert (await _allowed(hub, tok(key=K2))).device_id == "dev1"


async def test_host_is_case_insensitive(hub: Hub) -> None:
    assert (await _allowed(hub, tok("LocalHost/devices/dev1"))).device_id == "dev1"


async def test_port_on_the_token_host_is_ignored(hub: Hub) -> None:
    assert (await _allowed(hub, tok("localhost:8883/devices/dev1"))).device_id == "dev1"


async def test_trailing_slash_in_resource_is_tolerated(hub: Hub) -> None:
    assert (await _allowed(hub, tok(f"{HOST}/devices/dev1/"))).device_id == "dev1"


async def test_expiry_within_clock_skew_is_accepted(hub: Hub) -> None:
    assert (await _allowed(hub, tok(se=NOW - 299))).expires_at == NOW - 299


async def test_device_scoped_policy_token(hub: Hub) -> None:
    p = await _allowed(hub, tok(key=PK["device"][1], skn="device"))
    assert (p.credential, p.policy_name, p.device_id) == (
        CredentialKind.policy_device_token,
        "device",
        "dev1",
    )
    assert hub.audit.records[0]["details"] == {"policy": "device"}


async def test_hub_level_device_connect_policy_token(hub: Hub) -> None:
    p = await _allowed(hub, tok(HOST, PK["iothubowner"][0], skn="iothubowner"), device_id="dev2")
    assert (p.device_id, p.policy_name) == ("dev2", "iothubowner")


async def test_policy_token_works_for_an_x509_device(hub: Hub) -> None:
    assert (
        await _allowed(hub, tok(HOST, PK["device"][0], skn="device"), device_id="cam1")
    ).device_id == "cam1"


async def test_module_with_its_own_key(hub: Hub) -> None:
    p = await _allowed(hub, tok(f"{HOST}/devices/dev1/modules/m1", K3), module_id="m1")
    assert (p.kind, p.module_id, p.name) == (PrincipalKind.module, "m1", "device:dev1/m1")


async def test_device_wide_policy_token_covers_a_module(hub: Hub) -> None:
    p = await _allowed(hub, tok(f"{HOST}/devices/dev1", PK["device"][0], skn="device"), module_id="m1")
    assert p.kind is PrincipalKind.module


@pytest.mark.parametrize(("resource", "key", "module_id", "scope"), [
    (f"{HOST}/devices/dev1", K1, "m1", "device"),
    (f"{HOST}/devices/dev1/modules/m2", K2, "m1", "module"),
    (f"{HOST}/devices/dev1/modules/m1", K3, None, "module"),
])
async def test_scope_refusals_record_what_the_token_was_for(hub: Hub, resource: str, key: str,
                                                           module_id: str | None, scope: str) -> None:
    with pytest.raises(AuthRefused, match="wrong-scope"):
        await hub.auth.device_sas(tok(resource, key), "dev1", module_id, surface="mqtt", peer="p")
    record = hub.one_record("refused")
    assert record["details"] == {"tokenScope": scope}  # the kind of scope, never the ids in it
    assert record["principal"] == ("device:dev1/m1" if module_id else "device:dev1")


async def test_a_module_of_a_disabled_device_is_refused(hub: Hub) -> None:
    hub.devices.items["dev1"] = _device("dev1", status="disabled")
    with pytest.raises(AuthRefused, match="device-disabled"):
        await hub.auth.device_sas(tok(f"{HOST}/devices/dev1/modules/m1", K3), "dev1", "m1", surface="mqtt")


async def test_modules_are_refused_without_a_module_lookup() -> None:
    hub = Hub(with_modules=False)
    with pytest.raises(AuthRefused, match="unknown-module"):
        await hub.auth.device_sas(tok(f"{HOST}/devices/dev1/modules/m1", K3), "dev1", "m1", surface="mqtt")
    hub.one_record("refused")


async def test_device_sdk_generated_token_is_accepted() -> None:
    hub = Hub(now=time.time)
    token = str(RenewableSasToken(f"{HOST}/devices/dev1", SymmetricKeySigningMechanism(K2), ttl=3600))
    assert (await _allowed(hub, token)).credential is CredentialKind.device_key


async def test_captured_vector_is_accepted_by_the_authenticator() -> None:
    key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    hub = Hub(now=lambda: 1795392981 - 60)
    hub.devices.items["dev1"] = _device("dev1", auth={"type": "sas", "symmetricKey": {"primaryKey": key}})
    token = (
        "SharedAccessSignature sr=localhost%2Fdevices%2Fdev1"
        "&sig=VVWqmxbPMUEIbKav5a2cJpYL9j38xff0E1wt%2FMsscy8%3D&se=1795392981"
    )
    principal = await hub.auth.device_sas(token, "dev1", surface="mqtt")
    assert principal.expires_at == 1795392981
    hub.one_record("allowed")


# Positive service cases ----------------------------------------------------------------------------
async def test_service_sdk_header_is_accepted_with_port_in_host() -> None:
    hub = Hub(now=time.time)
    auth = ConnectionStringAuthentication(
        f"HostName=localhost:8443;SharedAccessKeyName=rrw;SharedAccessKey={PK['rrw'][1]}"
    )
    header = auth.signed_session().headers[auth.header]
    p = await hub.auth.service(header, required=Permission.registry_write, surface="rest")
    assert (p.kind, p.credential, p.policy_name, p.name) == (
        PrincipalKind.service,
        CredentialKind.policy,
        "rrw",
        "policy:rrw",
    )
    record = hub.one_record("allowed")
    assert record["principal"] == "policy:rrw" and record["credential"] == "policy"
    _assert_no_secrets(hub, header)


async def test_registry_read_write_implies_read(hub: Hub) -> None:
    p = await hub.auth.service(svc("rrw"), required=Permission.registry_read, surface="rest")
    assert p.has(Permission.registry_read) and p.has(Permission.registry_write)
    assert not p.has(Permission.service_connect)
    assert p.expires_at == LATER


async def test_owner_has_every_permission(hub: Hub) -> None:
    for perm in Permission:
        p = await hub.auth.service(svc(), required=perm, surface="rest")
        assert p.permissions == frozenset(Permission)
    assert [r["outcome"] for r in hub.audit.records] == ["allowed"] * len(Permission)


async def test_service_host_is_case_insensitive(hub: Hub) -> None:
    p = await hub.auth.service(
        svc("service", resource="LOCALHOST"), required=Permission.service_connect, surface="amqp"
    )
    assert p.policy_name == "service"
    assert hub.one_record("allowed")["action"] == "auth.amqp"


# Certificates ------------------------------------------------------------------------------------
async def test_certificate_with_matching_thumbprint(hub: Hub) -> None:
    p = await hub.auth.device_certificate([CERT], "cam1", surface="mqtt", peer="p")
    assert (p.credential, p.device_id, p.expires_at) == (CredentialKind.x509_self_signed, "cam1", None)
    record = hub.one_record("allowed")
    assert record["credential"] == "selfSigned"


CERT_REFUSALS: dict[str, tuple[list[x509.Certificate], str, str]] = {
    "no certificate": ([], "cam1", "no-client-certificate"),
    "thumbprint mismatch": ([OTHER_CERT], "cam1", "thumbprint-mismatch"),
    "sas device": ([CERT], "dev1", "wrong-auth-type"),
    "unknown device": ([CERT], "ghost", "unknown-device"),
    "disabled device, unknown certificate": ([CERT], "camoff", "thumbprint-mismatch"),
}


@pytest.mark.parametrize(("chain", "device_id", "reason"), CERT_REFUSALS.values(), ids=CERT_REFUSALS.keys())
async def test_certificate_refusals(
    hub: Hub, chain: list[x509.Certificate], device_id: str, reason: str
) -> None:
    with pytest.raises(AuthRefused) as info:
        await hub.auth.device_certificate(chain, device_id, surface="mqtt")
    assert info.value.reason == reason
    assert hub.one_record("refused")["reason"] == reason


async def test_disabled_certificate_device_is_refused_after_the_certificate_matches(hub: Hub) -> None:
    thumb = CERT.fingerprint(hashes.SHA1()).hex()
    hub.devices.items["camoff"] = _device(
        "camoff",
        status="disabled",
        auth={"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumb}},
    )
    with pytest.raises(AuthRefused, match="device-disabled"):
        await hub.auth.device_certificate([CERT], "camoff", surface="mqtt")
    hub.one_record("refused")


async def test_certificate_without_a_verifier_is_refused() -> None:
    hub = Hub()
    hub.auth._cert_verifier = None
    with pytest.raises(AuthRefused, match="x509-unavailable"):
        await hub.auth.device_certificate([CERT], "cam1", surface="mqtt")
    assert hub.one_record("refused")["credential"] == "selfSigned"


# Failures of the dependencies ----------------------------------------------------------------------
def _all_failures() -> float:
    return sum(sample.value for metric in REGISTRY.collect() if metric.name == "tether_auth_failures"
               for sample in metric.samples if sample.name == "tether_auth_failures_total")


async def test_lookup_failure_is_audited_and_propagates(hub: Hub) -> None:
    hub.devices.fail = True
    before = failures("http", "internal-error")
    with pytest.raises(RuntimeError):
        await hub.auth.device_sas(tok(), "dev1", surface="http")
    assert hub.one_record("refused")["reason"] == "internal-error"
    assert failures("http", "internal-error") == before + 1


async def test_throttled_refusals_are_all_counted_though_audited_in_aggregate() -> None:
    """The audit log aggregates throttled refusals; the metric still counts each one."""
    base = Hub()
    auth = Authenticator(hostname=HOST, devices=base.devices, policies=base.policies, audit=base.audit,
                         now=lambda: float(NOW), failure_rate=1.0, throttle_clock=lambda: 100.0)
    bad, throttled = failures("https", "invalid-credential"), failures("https", "auth-rate-limited")
    outcomes = []
    for _ in range(10):  # burst 2 (2 x rate), the clock stands still: 2 bad signatures, 8 throttled
        with pytest.raises(AuthRefused) as info:
            await auth.device_sas(tok(key=K3), "dev1", surface="https", peer="192.0.2.7:1")
        outcomes.append(info.value.reason)
    assert outcomes == ["bad-signature"] * 2 + ["auth-rate-limited"] * 8
    assert failures("https", "invalid-credential") == bad + 2
    assert failures("https", "auth-rate-limited") == throttled + 8
    assert len([r for r in base.audit.records if r["reason"] == "auth-rate-limited"]) < 8


def test_hmac_helper_matches_build_token() -> None:
    """Guards the test helpers: `tok()` is Azure's exact format."""
    expected = base64.b64encode(
        hmac.new(
            base64.b64decode(K1),
            f"{quote(f'{HOST}/devices/dev1', safe='')}\n{LATER}".encode(),
            hashlib.sha256,
        ).digest()
    ).decode()
    assert f"sig={quote(expected, safe='')}" in tok()
