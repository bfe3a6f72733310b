"""The web console at `/console`: static files shipped in this package (plain ES modules, no build
step, no CDN; docs/decisions/0010-operator-identity.md) and the few routes only the console needs
(sign-in, sign-out, who am I, overview and security summaries). Everything else the console shows
or changes goes through the ordinary REST API with the operator's session, so the same guard, roles
and audit apply."""

from tether.console.routes import CONSOLE_ROUTES, add_console_routes

__all__ = ["CONSOLE_ROUTES", "add_console_routes"]
