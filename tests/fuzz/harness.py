"""A fuzz harness: a Hypothesis strategy, a check that must never crash, and seed inputs.

One definition serves both pytest (`test_*` modules run each harness for `FUZZ_EXAMPLES` inputs)
and `python -m tests.fuzz.run --count N` (long runs). A "crash" is any exception escaping `check`:
each check catches the one error type its target is allowed to raise and asserts its invariants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

CORPUS_DIR = Path(__file__).parent / "corpus"


def fuzz_examples(default: int = 2000) -> int:
    """Inputs per harness in a normal test run; raise it with FUZZ_EXAMPLES for longer runs."""
    return int(os.environ.get("FUZZ_EXAMPLES", str(default)))


def corpus(area: str) -> list[tuple[str, bytes]]:
    """The seed files of one area (`corpus/<area>/*.bin`), sorted by name."""
    return [(path.name, path.read_bytes()) for path in sorted((CORPUS_DIR / area).glob("*.bin"))]


@dataclass(frozen=True)
class Harness:
    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    seeds: Sequence[Any] = field(default_factory=tuple)

    def run(self, count: int, counter: list[int] | None = None) -> int:
        """Run the seeds, then `count` generated inputs; return how many inputs were checked.

        Raises whatever `check` raised on the (shrunk) failing input; `counter[0]` (when given)
        still tells how many inputs ran before that.
        """
        seen = counter if counter is not None else [0]

        def body(value: Any) -> None:
            seen[0] += 1
            self.check(value)

        test = body
        for seed in reversed(self.seeds):
            test = example(seed)(test)
        wrapped = settings(
            max_examples=count,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(given(self.strategy)(test))
        wrapped()
        return seen[0]
