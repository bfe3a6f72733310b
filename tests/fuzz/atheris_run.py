"""Run one atheris target: `python -m tests.fuzz.atheris_run TARGET [libFuzzer flags]`.

libFuzzer can fuzz only once per process, so `tests.fuzz.run` and the CI test start one process per
target. `tether` is instrumented for coverage as it is imported. Unless corpus directories are given,
new inputs go to a temporary directory and the seeds are read from `tests/fuzz/corpus/<corpus>`
(the repository's corpus is never written); crash inputs go to `-artifact_prefix` (default: the
temporary directory, printed). To turn a crash into a regression test, copy its file into the
target's corpus directory as `crash-<what>.bin`: both engines replay it on every run.
Common flags: `-runs=N` (inputs), `-seed=S` (reproducible), `-max_total_time=S`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .harness import CORPUS_DIR

ROOT = Path(__file__).resolve().parents[2]


def run_target(name: str, runs: int, seed: int = 1, *flags: str, timeout: float = 600
               ) -> tuple[subprocess.CompletedProcess[str], int]:
    """Fuzz `name` for `runs` inputs in a child process: (the finished process, inputs it ran)."""
    command = [sys.executable, "-m", "tests.fuzz.atheris_run", name, f"-runs={runs}", f"-seed={seed}",
               "-rss_limit_mb=2048", "-timeout=30", *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    done = re.search(r"Done (\d+) runs", result.stderr)
    return result, int(done.group(1)) if done else 0


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit("usage: python -m tests.fuzz.atheris_run TARGET [libFuzzer flags]")
    import atheris  # only in the child: the parent may run without it

    name, flags = argv[1], argv[2:]
    with atheris.instrument_imports(include=["tether"]):
        from .atheris_targets import SELFTEST, TARGETS
    if name not in TARGETS and name != SELFTEST.name:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    target = TARGETS.get(name, SELFTEST)
    work = Path(tempfile.mkdtemp(prefix=f"tether-fuzz-{name}-"))
    if not any(flag.startswith("-artifact_prefix=") for flag in flags):
        flags.append(f"-artifact_prefix={work}/")
    if all(flag.startswith("-") for flag in flags):  # no corpus directories given
        (work / "corpus").mkdir()
        flags += [str(work / "corpus"), str(CORPUS_DIR / target.corpus)]
    print(f"atheris {name}: work dir {work}", file=sys.stderr, flush=True)
    atheris.Setup([argv[0], *flags], target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
