"""C2D fixtures live in helpers.py (shared with tests/device_http)."""

from c2d.helpers import anon, base_url, hub, service

__all__ = ["anon", "base_url", "hub", "service"]
