"""Service REST API on aiohttp: `tether.api.app.build_app(hub)`; reference in docs/api.md."""
