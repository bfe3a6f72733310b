"""Run the hub exactly like `tether run` (`tether.server.run`: uvloop when installed), under pyinstrument.

py-spy cannot attach in this sandbox ("Failed to find python version from target process": the
process memory it reads is not available), so the bench profiles in-process: pyinstrument comes from
the tools venv `bench/.venv-tools` (never the project venv) and is put on `sys.path` here only.

    TETHER_CONFIG=bench.toml .venv/bin/python bench/profile_hub.py OUT.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

PY = f"python{sys.version_info[0]}.{sys.version_info[1]}"
TOOLS = Path(__file__).resolve().parent / ".venv-tools" / "lib" / PY


def main(out: Path) -> None:
    sys.path.append(str(TOOLS / "site-packages"))
    from pyinstrument import Profiler

    from tether.config import load_settings
    from tether.server import run

    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        run(load_settings())
    finally:
        profiler.stop()
        out.write_text(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
