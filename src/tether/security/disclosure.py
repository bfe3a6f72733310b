"""Which credentials a principal may be shown: never one that grants more than the principal holds.

A shared access policy's key is a credential with that policy's rights, a device key a credential to
act as that device. Handing either to a caller that lacks those rights would let it escalate (issue
14: a RegistryRead + RegistryReadWrite + ServiceConnect policy read `iothubowner`'s key, minted an
owner token and created a full-rights policy). So:

* policy keys (`GET /tether/policies[/{name}]?keys=true`, and every CLI path over REST: `policy list
  --show-keys`, `policy connection-string`, tokens minted from a remote policy) go only to a caller that
  holds RegistryReadWrite and ServiceConnect (key management rights) **and** every right of that policy
  (RegistryReadWrite counting as RegistryRead too);
* device keys (`GET /devices[/{id}]`, `/tether/devices/export`) go only to a caller that could act as
  the device anyway: one with RegistryReadWrite (it can set the keys) or DeviceConnect (it can sign a
  token for any device). A RegistryRead-only caller sees devices without keys and cannot export.
"""

from __future__ import annotations

from collections.abc import Iterable

from tether.security.principal import Permission, Principal
from tether.storage.base import PolicyRecord

__all__ = ["DEVICE_KEY_RIGHTS", "KEY_MANAGEMENT_RIGHTS", "may_read_device_keys", "may_read_policy_keys",
           "rights_of"]

KEY_MANAGEMENT_RIGHTS = frozenset({Permission.registry_write, Permission.service_connect})
DEVICE_KEY_RIGHTS = frozenset({Permission.registry_write, Permission.device_connect})  # any of them


def rights_of(permissions: Iterable[str]) -> frozenset[Permission]:
    """A policy's effective rights: the known ones, RegistryReadWrite implying RegistryRead."""
    known = {p.value for p in Permission}
    rights = {Permission(p) for p in permissions if p in known}
    if Permission.registry_write in rights:
        rights.add(Permission.registry_read)
    return frozenset(rights)


def may_read_policy_keys(caller: Principal, policy: PolicyRecord) -> bool:
    held = caller.permissions
    return KEY_MANAGEMENT_RIGHTS <= held and rights_of(policy.permissions) <= held


def may_read_device_keys(caller: Principal) -> bool:
    return bool(DEVICE_KEY_RIGHTS & caller.permissions)
