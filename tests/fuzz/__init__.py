"""Fuzz harnesses: run briefly under pytest, for longer with `python -m tests.fuzz.run --count N`."""
