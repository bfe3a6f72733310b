"""Where a running hub listens: `{data_dir}/run/hub.json`, written by `tether run` once its listeners
are bound and removed when it stops.

The CLI on the same host reads it to reach that hub's API at the address and port it really bound —
which may differ from the settings: `https_port = 0` binds an ephemeral port, and without the privilege
for port 443 the hub falls back to `listeners.https_fallback_port`. A file left behind by a crashed
hub is harmless: the CLI only uses it while the data dir's event stream is locked by a live process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["RUN_FILE", "Listening", "dial_host", "read_run_file", "remove_run_file", "write_run_file"]

RUN_FILE: Final = Path("run") / "hub.json"


@dataclass(frozen=True, slots=True)
class Listening:
    """The bound listeners of one hub process."""

    pid: int
    host: str  # listeners.host as bound (may be a wildcard)
    hostname: str  # hub.hostname: the name its certificate is for
    ports: dict[str, int]  # "https", "mqtts", "mqtt" → bound port

    @property
    def https_url(self) -> str | None:
        port = self.ports.get("https")
        if port is None:
            return None
        host = dial_host(self.host)
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def dial_host(bound: str) -> str:
    """The address a local client dials for a listener bound to `bound`: a wildcard means loopback."""
    if bound in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if bound == "::":
        return "::1"
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(bound.strip("[]")))
    return bound


def write_run_file(data_dir: Path, listening: Listening) -> Path:
    path = data_dir / RUN_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    doc = {"pid": listening.pid, "host": listening.host, "hostname": listening.hostname,
           "ports": listening.ports}
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run_file(data_dir: Path) -> Listening | None:
    """The run file's content, or None when absent or unreadable (an older hub, a crash mid-write)."""
    try:
        doc = json.loads((data_dir / RUN_FILE).read_text(encoding="utf-8"))
        ports = {str(k): int(v) for k, v in dict(doc["ports"]).items()}
        return Listening(int(doc["pid"]), str(doc["host"]), str(doc["hostname"]), ports)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_run_file(data_dir: Path, pid: int) -> None:
    """Remove the file if it is still this process's (another hub may have replaced it)."""
    current = read_run_file(data_dir)
    if current is not None and current.pid == pid:
        with contextlib.suppress(OSError):
            (data_dir / RUN_FILE).unlink()
