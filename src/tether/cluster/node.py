"""Node identity and the names the hub nodes share on NATS: subjects, KV buckets and keys.

Node ids and the subject prefix are single NATS tokens (`[A-Za-z0-9_-]`) so they can be put into
subjects and bucket names as they are. Device and module ids may contain `.`, `*`, `$`, `%`, … which
NATS subjects and KV keys cannot carry, so they are escaped (`=XX`, upper-case hex of the ASCII code):
reversible, and the identity of ids made only of letters, digits, `_` and `-`.
"""

from __future__ import annotations

import os
import re
import socket
import string
from typing import Final

__all__ = [
    "NODE_ID_RE",
    "PREFIX_RE",
    "Names",
    "decode_id",
    "default_node_id",
    "encode_id",
    "identity_key",
    "resolve_node_id",
]

NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SAFE: Final = frozenset(string.ascii_letters + string.digits + "_-")
_ESCAPE_RE: Final = re.compile(r"=([0-9A-F]{2})")


def default_node_id() -> str:
    """`{hostname}-{pid}`: unique per process on a host, readable in logs (characters outside
    `[A-Za-z0-9_-]` become `-`)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "node"
    return f"{host[:48]}-{os.getpid()}"


def resolve_node_id(configured: str | None) -> str:
    """The configured `cluster.node_id`, or `default_node_id()` when unset."""
    return configured or default_node_id()


def encode_id(value: str) -> str:
    """A device or module id as one NATS subject token / KV key token."""
    return "".join(c if c in _SAFE else f"={ord(c):02X}" for c in value)


def decode_id(token: str) -> str:
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), token)


def identity_key(device_id: str, module_id: str | None) -> str:
    """KV key of a device (`{device}`) or module (`{device}.{module}`) identity."""
    key = encode_id(device_id)
    return key if module_id is None else f"{key}.{encode_id(module_id)}"


class Names:
    """Subjects and buckets of one cluster (`cluster.subject_prefix`, default `tether`).

    - `{p}.ctl.device.{id}.drop` – broadcast: the device was disabled or deleted;
    - `{p}.node.{node}.{c2d|desired|takeover}` – notices for the node holding a device;
    - `{p}.rpc.{node}.method` – direct-method requests (request/reply) for the node holding it;
    - KV `{p}_presence` – identity → holding node; KV `{p}_sessions` – persistent-session subscriptions.
    """

    def __init__(self, prefix: str) -> None:
        if not PREFIX_RE.fullmatch(prefix):
            raise ValueError("the cluster subject prefix must be 1-32 of [A-Za-z0-9_-]")
        self.prefix = prefix
        self.presence_bucket = f"{prefix}_presence"
        self.sessions_bucket = f"{prefix}_sessions"
        self.drop_wildcard = f"{prefix}.ctl.device.*.drop"

    @property
    def registry_changed(self) -> str:
        return f"{self.prefix}.ctl.registry.changed"

    @property
    def policies_changed(self) -> str:
        return f"{self.prefix}.ctl.policies.changed"

    def drop(self, device_id: str) -> str:
        return f"{self.prefix}.ctl.device.{encode_id(device_id)}.drop"

    def node(self, node_id: str, kind: str) -> str:
        return f"{self.prefix}.node.{node_id}.{kind}"

    def node_wildcard(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.*"

    def method(self, node_id: str) -> str:
        return f"{self.prefix}.rpc.{node_id}.method"
