"""Run every registered fuzz harness for N inputs: `python -m tests.fuzz.run --count N`.

To add harnesses (SAS tokens, connection strings, the query parser, ...), write a
`tests/fuzz/test_fuzz_<area>.py` exposing `HARNESSES: list[Harness]` and add its name below.
Exit status 1 when any harness crashed; each crash prints the shrunk input and traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from .harness import Harness

HARNESS_MODULES: list[str] = [
    "test_fuzz_mqtt",
    "test_fuzz_security", "test_fuzz_rest",
]


def load(only: str | None = None) -> list[Harness]:
    harnesses: list[Harness] = []
    for name in HARNESS_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        harnesses += [h for h in module.HARNESSES if only is None or only in h.name]
    return harnesses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="generated inputs per harness")
    parser.add_argument("--only", help="run only harnesses whose name contains this")
    parser.add_argument("--list", action="store_true", help="list harness names and exit")
    args = parser.parse_args(argv)
    harnesses = load(args.only)
    if args.list:
        print("\n".join(h.name for h in harnesses))
        return 0
    crashed, total = 0, 0.0
    for harness in harnesses:
        started = time.perf_counter()
        counter = [0]
        crashes = 0
        try:
            harness.run(args.count, counter)
        except Exception:
            traceback.print_exc()
            crashes = 1
        crashed += crashes
        print(f"{harness.name}: {counter[0]} inputs, {crashes} crashes", flush=True)
        total += time.perf_counter() - started
    print(f"{len(harnesses)} harnesses, {crashed} crashed, {total:.1f}s", file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
