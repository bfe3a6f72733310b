"""C2D fixtures live in helpers.py (in tests/c2d)."""

from c2d.helpers import anon, base_url, hub, service

__all__ = ["anon", "base_url", "hub", "service"]
