"""Run every fuzz harness for N inputs: `python -m tests.fuzz.run --count N [--engine E]`.

Two engines: the Hypothesis harnesses (structured inputs, run in this process) and the atheris
targets (coverage-guided bytes, `tests/fuzz/atheris_targets.py`, one child process each).

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

from .atheris_run import run_target
from .atheris_targets import TARGETS
from .harness import Harness

HARNESS_MODULES: list[str] = [
    "test_fuzz_mqtt", "test_fuzz_amqp",
    "test_fuzz_security", "test_fuzz_rest", "test_fuzz_http",
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
    parser.add_argument("--engine", choices=["all", "hypothesis", "atheris"], default="all")
    parser.add_argument("--seed", type=int, default=1, help="atheris seed (0: random)")
    args = parser.parse_args(argv)
    harnesses = load(args.only) if args.engine != "atheris" else []
    targets = [t for t in TARGETS if args.engine != "hypothesis" and (args.only is None or args.only in t)]
    if args.list:
        print("\n".join([*(f"hypothesis {h.name}" for h in harnesses), *(f"atheris {t}" for t in targets)]))
        return 0
    started = time.perf_counter()
    crashed = sum(_run_hypothesis(h, args.count) for h in harnesses)
    crashed += sum(_run_atheris(name, args.count, args.seed) for name in targets)
    print(f"{len(harnesses)} hypothesis harnesses, {len(targets)} atheris targets, {crashed} crashed, "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 1 if crashed else 0


def _run_hypothesis(harness: Harness, count: int) -> int:
    counter = [0]
    crashes = 0
    try:
        harness.run(count, counter)
    except Exception:
        traceback.print_exc()
        crashes = 1
    print(f"hypothesis {harness.name}: {counter[0]} inputs, {crashes} crashes", flush=True)
    return crashes


def _run_atheris(name: str, count: int, seed: int) -> int:
    result, ran = run_target(name, count, seed, timeout=24 * 3600)
    crashes = 0 if result.returncode == 0 else 1
    if crashes:
        print((result.stdout + result.stderr)[-6000:], file=sys.stderr)
    print(f"atheris {name}: {ran} inputs, {crashes} crashes", flush=True)
    return crashes


if __name__ == "__main__":
    sys.exit(main())
