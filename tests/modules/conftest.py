"""Module-identity fixtures. The hub harness is shared with tests/methods (`methods_helpers`) and the
telemetry reader with tests/mqtt (`mqtt_helpers`), so both directories are put on the import path."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
for _name in ("methods", "mqtt"):
    _path = str(_TESTS / _name)
    if _path not in sys.path:
        sys.path.insert(0, _path)
