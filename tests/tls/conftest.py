from __future__ import annotations

from pathlib import Path

import pytest
from tls_helpers import DevPki, make_pki


@pytest.fixture
def dev_pki(tmp_path: Path) -> DevPki:
    return make_pki(tmp_path / "pki")
