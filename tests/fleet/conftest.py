"""Fleet tests: file upload, jobs, configurations. Azurite comes from the shared `azurite_helpers`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from azurite_helpers import azurite_server  # noqa: F401  (fixture re-export)
