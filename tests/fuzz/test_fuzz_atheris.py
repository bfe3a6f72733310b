"""The CI pass of the coverage-guided targets: each runs 20,000 seeded inputs (FUZZ_RUNS) in its own
process (libFuzzer fuzzes once per process) from the shared corpus, and must finish without a crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .atheris_run import run_target
from .atheris_targets import SELFTEST, TARGETS
from .harness import CORPUS_DIR

RUNS = int(os.environ.get("FUZZ_RUNS", "20000"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_runs_its_seeded_pass_without_a_crash(name: str) -> None:
    assert any((CORPUS_DIR / TARGETS[name].corpus).glob("*.bin")), "every target starts from seeds"
    result, ran = run_target(name, RUNS)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert ran >= RUNS, result.stderr[-2000:]


def test_a_crash_is_reported_with_its_input(tmp_path: Path) -> None:
    """The rig itself: an input that breaks an invariant fails the run and is saved for replay."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "bad.bin").write_bytes(b"\x00crash-me")
    result, _ = run_target(SELFTEST.name, 10, 1, f"-artifact_prefix={tmp_path}/", str(seeds))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Uncaught Python exception" in output and "planted crash" in output
    saved = list(tmp_path.glob("crash-*"))
    assert saved and saved[0].read_bytes() == b"\x00crash-me"
