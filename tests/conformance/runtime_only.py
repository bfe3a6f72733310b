"""Run the `tether` command with the test-only dependencies made unimportable.

`make run` installs the runtime dependencies only (`pip install -e .`); this wrapper proves that is
enough for `tether init` / `tether run` / the quickstart commands: importing any package of the `test`
extra fails here as it would in such a venv.

    python runtime_only.py init --if-needed
"""

from __future__ import annotations

import importlib.abc
import sys

TEST_ONLY = (
    "azure",
    "paho",
    "sslyze",
    "pytest",
    "_pytest",
    "hypothesis",
    "mypy",
    "atheris",
    "six",
    "msrest",
    "uamqp",
    "ruff",
)


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname.split(".")[0] in TEST_ONLY:
            raise ModuleNotFoundError(f"{fullname} is a test-only dependency (not installed by `make run`)")


if __name__ == "__main__":
    sys.meta_path.insert(0, _Blocker())
    from tether.cli.main import main

    sys.argv = ["tether", *sys.argv[1:]]
    main()
