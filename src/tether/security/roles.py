"""Operator roles: Azure IoT Hub's data-plane roles plus Owner, and what each may do.

Azure grants people (not shared keys) one of four built-in data-plane roles; Tether mirrors them and
adds `Owner` for what Azure keeps in its control plane (shared access policies, TLS and trust
administration, operators and role assignments):

| Role | Registry | Twins | Service (C2D, methods) | Telemetry | Jobs | Configs | Audit | Admin | Keys |
|---|---|---|---|---|---|---|---|---|---|
| Owner | write | write | write | write | write | write | read | write | yes |
| DataContributor | write | write | write | write | write | write | read | read | yes |
| DataReader | read | read | — | read | read | read | read | read | no |
| RegistryContributor | write | read | — | — | — | — | — | — | yes |
| TwinContributor | read | write | — | — | — | — | — | — | no |

A role maps onto the shared-access-policy rights (`rights_of`), so the route guard's one rights check
(`required in principal.permissions`) applies to people exactly as to policies. The areas are the finer
distinctions where Azure's roles differ from the four rights (a Twin Contributor holds
RegistryReadWrite for twins but may not write device identities; a Data Reader may follow telemetry,
which needs ServiceConnect, but may not send C2D messages or invoke methods). Jobs and configurations
are their own areas because Azure grants them (`IotHubs/jobs/*`, `IotHubs/configurations/*`) only to
Data Contributor (`IotHubs/*`) and, for reading, Data Reader (`IotHubs/*/read`): a Registry or Twin
Contributor holds RegistryReadWrite but may not schedule jobs or change configurations.

A grant may be scoped to devices by a query condition (`tags.site = 'plant-1'`): then it covers only
devices whose twin matches, and only operations that name such a device (the api layer evaluates the
condition with `tether.messaging.query`; this module only carries its text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from tether.security.principal import Permission

__all__ = [
    "AZURE_NAMES",
    "Access",
    "Area",
    "Decision",
    "Role",
    "RoleGrant",
    "access_of",
    "decide",
    "may_see_keys",
    "parse_role",
    "rights_of",
]


class Role(StrEnum):
    owner = "Owner"
    data_contributor = "DataContributor"
    data_reader = "DataReader"
    registry_contributor = "RegistryContributor"
    twin_contributor = "TwinContributor"


AZURE_NAMES: dict[Role, str] = {
    Role.owner: "Owner",
    Role.data_contributor: "IoT Hub Data Contributor",
    Role.data_reader: "IoT Hub Data Reader",
    Role.registry_contributor: "IoT Hub Registry Contributor",
    Role.twin_contributor: "IoT Hub Twin Contributor",
}


class Area(StrEnum):
    registry = "registry"  # device identities, statistics, import/export
    twins = "twins"  # twins and the twin query
    service = "service"  # C2D send/purge/feedback, direct methods
    telemetry = "telemetry"  # the consumer API (/tether/events), file upload notifications
    jobs = "jobs"  # jobs v2 (twin updates, methods) and import/export jobs
    configurations = "configurations"  # automatic device configurations, applyConfigurationContent
    audit = "audit"  # the audit log and security status
    admin = "admin"  # policies, TLS and trust administration, operators and roles


class Access(IntEnum):
    none = 0
    read = 1
    write = 2


_R, _W = Access.read, Access.write
ROLE_ACCESS: dict[Role, dict[Area, Access]] = {
    Role.owner: dict.fromkeys(Area, _W) | {Area.audit: _R},
    Role.data_contributor: {Area.registry: _W, Area.twins: _W, Area.service: _W, Area.telemetry: _W,
                            Area.jobs: _W, Area.configurations: _W, Area.audit: _R, Area.admin: _R},
    Role.data_reader: {Area.registry: _R, Area.twins: _R, Area.telemetry: _R, Area.jobs: _R,
                       Area.configurations: _R, Area.audit: _R, Area.admin: _R},
    Role.registry_contributor: {Area.registry: _W, Area.twins: _R},
    Role.twin_contributor: {Area.registry: _R, Area.twins: _W},
}
_KEY_ROLES = frozenset({Role.owner, Role.data_contributor, Role.registry_contributor})


def access_of(role: Role, area: Area) -> Access:
    return ROLE_ACCESS[role].get(area, Access.none)


def rights_of(role: Role) -> frozenset[Permission]:
    """The policy rights a role amounts to (what the route guard's rights check sees)."""
    access = ROLE_ACCESS[role]
    rights: set[Permission] = set()
    if any(access.get(a, Access.none) for a in (Area.registry, Area.twins, Area.audit, Area.admin)):
        rights.add(Permission.registry_read)
    if any(access.get(a, Access.none) >= _W for a in (Area.registry, Area.twins)):
        rights |= {Permission.registry_read, Permission.registry_write}
    if access.get(Area.service, Access.none) or access.get(Area.telemetry, Access.none):
        rights.add(Permission.service_connect)
    if role is Role.owner:
        rights.add(Permission.device_connect)  # owner operations check all four rights
    return frozenset(rights)


_CANONICAL = {re.sub(r"[\s_-]", "", r.value).lower(): r for r in Role}
_CANONICAL |= {re.sub(r"[\s_-]", "", n).lower(): r for r, n in AZURE_NAMES.items()}
_CANONICAL |= {k.removeprefix("iothub"): r for k, r in list(_CANONICAL.items())}


def parse_role(text: str) -> Role:
    """`DataReader`, `data-reader`, `IoT Hub Data Reader` … → Role; ValueError otherwise."""
    role = _CANONICAL.get(re.sub(r"[\s_-]", "", str(text)).lower())
    if role is None:
        raise ValueError(f"unknown role {text!r}; roles: {', '.join(r.value for r in Role)}")
    return role


@dataclass(frozen=True, slots=True)
class RoleGrant:
    """One role held by an operator: from a token claim (`source="claim"`) or assigned locally
    (`source="local"`), optionally scoped to devices matching `scope` (a query condition)."""

    role: Role
    scope: str | None = None
    source: str = "local"

    def to_json(self) -> dict[str, str | None]:
        return {"role": self.role.value, "scope": self.scope, "source": self.source}


@dataclass(frozen=True, slots=True)
class Decision:
    """`allowed`: some grant covers the operation; `scopes`: None when one of those grants is
    unscoped (every device), else the conditions of which a device must match at least one."""

    allowed: bool
    scopes: tuple[str, ...] | None = None

    @property
    def scoped(self) -> bool:
        return self.allowed and self.scopes is not None


def decide(grants: tuple[RoleGrant, ...], area: Area, access: Access) -> Decision:
    covering = [g for g in grants if access_of(g.role, area) >= access]
    if not covering:
        return Decision(False)
    if any(g.scope is None for g in covering):
        return Decision(True, None)
    return Decision(True, tuple(dict.fromkeys(g.scope for g in covering if g.scope is not None)))


def may_see_keys(grants: tuple[RoleGrant, ...]) -> Decision:
    """Device keys are a device's credential: only roles that may rewrite identities see them."""
    covering = [g for g in grants if g.role in _KEY_ROLES]
    if not covering:
        return Decision(False)
    if any(g.scope is None for g in covering):
        return Decision(True, None)
    return Decision(True, tuple(dict.fromkeys(g.scope for g in covering if g.scope is not None)))
