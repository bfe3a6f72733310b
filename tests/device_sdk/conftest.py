"""Device-SDK end-to-end fixtures. The hub harness is shared with tests/methods (`methods_helpers`),
so that directory is put on the import path here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "methods"))
