"""`tether cluster --nodes 2`: starts two nodes on PostgreSQL + NATS, prints their addresses, and
Ctrl-C (SIGINT to the launcher) stops both."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from backend_env import NATS_URL, scaleout_backends

from tether.cli.cluster import render_toml


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_launcher_starts_and_stops_nodes(tmp_path: Path) -> None:
    with scaleout_backends() as (backend, names):
        data = tmp_path / "hub"
        data.mkdir()
        (data / "tether.toml").write_text(render_toml({
            "hub": {"hostname": "localhost"},
            "listeners": {"host": "127.0.0.1"},
            "storage": {"stream_url": names.stream_url},
            "cluster": {"subject_prefix": names.prefix},
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        launcher = subprocess.Popen(
            [sys.executable, "-m", "tether.cli.main", "--data-dir", str(data), "cluster", "--nodes", "2",
             "--plain-mqtt", "--database-url", backend.storage["database_url"], "--nats-url", NATS_URL],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), text=True)
        pids: list[int] = []
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:  # readline blocks: read in a thread so the wait below has a deadline
            assert launcher.stdout is not None
            for line in launcher.stdout:
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if not line:
                    break
                seen.append(line)
                if line.startswith("Service connection string:"):  # the launcher prints it, once
                    break
            text = "".join(seen)
            assert "2 Tether nodes running" in text, text
            nodes = re.findall(r"(node-\d)\s+pid (\d+)\s+(?:amqps \S+\s+)?"
                               r"https 127.0.0.1:(\d+)\s+mqtt 127.0.0.1:(\d+)", text)
            assert [n[0] for n in nodes] == ["node-0", "node-1"], text
            pids = [int(n[1]) for n in nodes]
            for _, _, https, mqtt in nodes:
                socket.create_connection(("127.0.0.1", int(https)), timeout=2).close()
                socket.create_connection(("127.0.0.1", int(mqtt)), timeout=2).close()
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(30) == 0
            assert not [pid for pid in pids if _alive(pid)]
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(10)
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
