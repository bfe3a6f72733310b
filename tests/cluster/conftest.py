"""The cluster tests reuse the backend kit of `tests/backends` (services, nodes, REST, paho device)."""

from __future__ import annotations

import sys
from pathlib import Path

KIT = str(Path(__file__).resolve().parents[1] / "backends")
if KIT not in sys.path:
    sys.path.insert(0, KIT)
