"""`tether run` as a real process: it serves, prints its listeners (never a key), answers the
CLI's remote mode over HTTPS (verified with the data dir's dev root CA) and stops on SIGINT."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from .conftest import Cli


def _reader(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_run_serves_until_sigint(cli: Cli, owner_cs: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({
        "TETHER_LISTENERS__HOST": "127.0.0.1",
        "TETHER_LISTENERS__MQTT_PORT": "0",
        "TETHER_LISTENERS__HTTPS_PORT": "0",
        "TETHER_LISTENERS__AMQP_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli.main", "--data-dir", str(cli.data_dir), "run"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("Tether hub ready") for line in seen):
            assert proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError("hub did not start:\n" + "".join(seen)) from None
        output = "".join(seen)
        owner_key = owner_cs.split("SharedAccessKey=", 1)[1]
        assert owner_key not in output and "SharedAccessKey" not in output  # only init prints it
        assert "tether policy connection-string iothubowner" in output
        match = re.search(r"https\s+listening on 127\.0\.0\.1:(\d+)", output)
        assert match, output
        url = f"https://localhost:{match.group(1)}"
        cli("--hub-url", url, "--connection-string", owner_cs, "device", "create", "live1")
        assert "live1" in cli("--hub-url", url, "--connection-string", owner_cs, "device", "list").stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0
