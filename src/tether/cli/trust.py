"""`tether tls reload` and `tether trust …`: TLS and root-rollover administration of a running hub.

These act on the hub process (its TLS context, its rollover state), so they work in remote mode only:
`--hub-url` plus an owner connection string (a policy with all four rights, e.g. `iothubowner`),
the same global options as every remote command. The admin routes are `/tether/admin/tls/reload` and
`/tether/admin/trust[/next-root|switch|retire]`; `trust bundle` fetches `GET /tether/trust-bundle` and,
with `--verify-with`, checks its signature the way a device does (`pki.verify_trust_bundle`).

HTTPS is verified with `--ca-file`, else with the data dir's root **and its next root when one exists**
— after `trust switch` the hub serves a certificate from the next root, and the operator must still
be able to run `trust retire` — else with the system CAs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import ssl
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from cryptography import x509

from tether.cli.context import CliState, fail, run, state_of
from tether.cli.output import echo_json, table
from tether.cli.remote import API_VERSION, TIMEOUT_S, error_from_response
from tether.config import ConfigError
from tether.errors import BadRequest, TetherError
from tether.security import pki
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token
from tether.security.trust import sha256_hex

__all__ = ["tls_app", "trust_app"]

tls_app = typer.Typer(help="The hub's TLS certificate (remote mode, owner policy).", no_args_is_help=True)
trust_app = typer.Typer(help="Root certificate rollover and the signed trust bundle (remote mode; owner "
                        "policy, except `bundle`).", no_args_is_help=True)

ADMIN = "/tether/admin"
BUNDLE_PATH = "/tether/trust-bundle"
VERSION_HEADER = "x-tether-trust-bundle-version"
TOKEN_TTL_S = 600  # one command: a short-lived owner token
AsJson = Annotated[bool, typer.Option("--json", help="Print the hub's JSON document.")]


# --- transport -----------------------------------------------------------------------------------


def _verify(state: CliState) -> ssl.SSLContext | bool:
    if state.ca_file is not None:
        if not state.ca_file.is_file():
            raise BadRequest(f"CA file {state.ca_file} does not exist", field="ca_file")
        return ssl.create_default_context(cafile=str(state.ca_file))
    if not (state.hub_url or "").startswith("https://"):
        return True
    with contextlib.suppress(ConfigError):
        pki_dir = state.settings().pki_dir
        roots = [p for p in (pki_dir / pki.ROOT_CERT, pki_dir / pki.NEXT_ROOT_CERT) if p.is_file()]
        if roots:
            return ssl.create_default_context(cadata="".join(p.read_text("ascii") for p in roots))
    return True


async def _call(state: CliState, method: str, path: str) -> httpx.Response:
    """One request to the running hub with a fresh token from the connection string."""
    if not state.hub_url:
        raise BadRequest("this command talks to a running hub: pass --hub-url (or set TETHER_HUB_URL) and an "
                         "owner --connection-string", field="hub_url")
    if not state.connection_string:
        raise BadRequest("--hub-url needs a service connection string: pass --connection-string or set "
                         "TETHER_CONNECTION_STRING", field="connection_string")
    base = state.hub_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise BadRequest("--hub-url must start with http:// or https://", field="hub_url")
    cs = ServiceConnectionString.parse(state.connection_string)
    token = build_token(cs.host_name, cs.shared_access_key, int(time.time()) + TOKEN_TTL_S,
                        policy_name=cs.shared_access_key_name)
    async with httpx.AsyncClient(
        base_url=base, verify=_verify(state), timeout=TIMEOUT_S,
        headers={"Authorization": token, "Accept": "application/json"}, params={"api-version": API_VERSION},
    ) as client:
        response = await client.request(method, path)
    if response.status_code >= 400:
        raise error_from_response(response)
    return response


def _document(ctx: typer.Context, method: str, path: str) -> dict[str, Any]:
    async def body() -> dict[str, Any]:
        doc = (await _call(state_of(ctx), method, path)).json()
        if not isinstance(doc, dict):
            raise TetherError("unexpected answer from the hub", code="BadResponse")
        return doc

    return run(body)


# --- printing ------------------------------------------------------------------------------------


def _pairs(rows: list[tuple[str, Any]], *, err: bool = False) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key.ljust(width)}  {'-' if value is None else value}", err=err)


def _cert_line(info: dict[str, Any] | None) -> str | None:
    if not info:
        return None
    return f"{info.get('subject')}  SHA256 {info.get('thumbprint')}  notAfter {info.get('notAfter')}"


def _print_state(doc: dict[str, Any], *, with_changed: bool) -> None:
    rows: list[tuple[str, Any]] = [("version", doc.get("version")), ("phase", doc.get("phase"))]
    if with_changed:
        rows.append(("changed", "yes" if doc.get("changed") else "no (already done)"))
    rows += [
        ("currentRoot", _cert_line(doc.get("currentRoot"))),
        ("nextRoot", _cert_line(doc.get("nextRoot"))),
        ("serverCertificate", _cert_line(doc.get("serverCertificate"))),
        ("servedCertificate", _cert_line(doc.get("servedCertificate"))),
    ]
    served = doc.get("servedCertificate") or {}
    if served.get("issuer"):
        rows.append(("servedIssuer", served["issuer"]))
    _pairs(rows)
    roots = doc.get("roots") or []
    if roots:
        typer.echo("")
        table(["BUNDLE ROOT", "SHA256 THUMBPRINT", "NOT AFTER"],
              [(r.get("subject"), r.get("thumbprint"), r.get("notAfter")) for r in roots])


def _state_command(ctx: typer.Context, method: str, path: str, as_json: bool) -> None:
    doc = _document(ctx, method, path)
    if as_json:
        echo_json(doc)
    else:
        _print_state(doc, with_changed=method == "POST")


# --- tls -----------------------------------------------------------------------------------------


@tls_app.command("reload")
def tls_reload(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Re-read the server certificate files (like SIGHUP); prints the certificate now served.

    New connections get the new certificate, live ones keep theirs; a broken file keeps the old one."""
    doc = _document(ctx, "POST", f"{ADMIN}/tls/reload")
    if as_json:
        echo_json(doc)
        return
    _pairs([("thumbprint", doc.get("thumbprint")), ("notAfter", doc.get("notAfter")),
            ("subject", doc.get("subject")), ("issuer", doc.get("issuer")),
            ("generation", doc.get("generation"))])


# --- trust ---------------------------------------------------------------------------------------


@trust_app.command("status")
def trust_status(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Where the hub is in a rollover: bundle version, phase, roots, server certificate."""
    _state_command(ctx, "GET", f"{ADMIN}/trust", as_json)


@trust_app.command("next-root")
def trust_next_root(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Step 1: create the next root; the new bundle lists both roots, signed by the current one."""
    _state_command(ctx, "POST", f"{ADMIN}/trust/next-root", as_json)


@trust_app.command("switch")
def trust_switch(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Step 2 (once devices hold the new bundle): server certificate under the next root, hot reload."""
    _state_command(ctx, "POST", f"{ADMIN}/trust/switch", as_json)


@trust_app.command("retire")
def trust_retire(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Step 3: the next root becomes current; the new bundle lists only it, signed by it."""
    _state_command(ctx, "POST", f"{ADMIN}/trust/retire", as_json)


def _payload(data: bytes) -> dict[str, Any]:
    """The bundle's payload, decoded (its signature is checked separately, or not at all)."""
    try:
        doc = json.loads(data)
        body = json.loads(base64.b64decode(doc["payload"], validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise TetherError(f"the hub sent a malformed trust bundle ({type(exc).__name__})",
                          code="TrustBundleMalformed") from None
    if not isinstance(body, dict):
        raise TetherError("the hub sent a malformed trust bundle", code="TrustBundleMalformed")
    return body


def _unverified_roots(body: dict[str, Any]) -> list[x509.Certificate]:
    try:
        return [x509.load_pem_x509_certificate(p.encode("ascii")) for p in body.get("roots") or []]
    except (ValueError, TypeError, AttributeError):
        raise TetherError("the hub sent a malformed trust bundle", code="TrustBundleMalformed") from None


def _pinned(paths: list[Path]) -> list[x509.Certificate]:
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            roots += pki.load_certificates(path)
        except ValueError:
            raise BadRequest(f"{path} holds no PEM certificate", field="verify_with") from None
    if not roots:
        raise BadRequest("--verify-with files hold no certificate", field="verify_with")
    return roots


@trust_app.command("bundle")
def trust_bundle(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", help="Write the bundle to this file.", dir_okay=False,
                                             show_default=False)] = None,
    verify_with: Annotated[list[Path] | None, typer.Option(
        "--verify-with", help="Root certificate(s) you already trust (PEM; repeatable): the bundle must be "
        "signed by one of them.", exists=True, dir_okay=False, show_default=False)] = None,
    min_version: Annotated[int | None, typer.Option(
        "--min-version", min=1, help="Refuse a bundle older than this version (the one you hold).",
        show_default=False)] = None,
) -> None:
    """Fetch the hub's signed trust bundle (any credential the hub accepts).

    Without --out or --verify-with the bundle is printed as is.

    Otherwise its version, signer and roots are printed; one failing --verify-with is not written."""
    state = state_of(ctx)
    if min_version is not None and not verify_with:
        raise fail("error: --min-version needs --verify-with (an unverified version means nothing)")

    async def body() -> bytes:
        return (await _call(state, "GET", BUNDLE_PATH)).content

    data = run(body)
    if out is None and not verify_with:
        typer.echo(data.decode("utf-8", "replace").rstrip("\n"))
        return
    payload = _payload(data)
    if verify_with:
        try:
            roots = pki.verify_trust_bundle(data, _pinned(verify_with), min_version=min_version)
        except pki.TrustBundleError as exc:
            raise fail(f"error: trust bundle NOT verified: {exc}") from None
        verified = f"yes, signed by a root in {', '.join(str(p) for p in verify_with)}"
    else:
        roots = _unverified_roots(payload)
        verified = "NO (pass --verify-with ROOT.pem to check the signature)"
    if out is not None:
        try:
            out.write_bytes(data)
        except OSError as exc:
            raise fail(f"error: cannot write {out}: {exc.strerror or exc}") from None
    signer = json.loads(data).get("signer")
    _pairs([("version", payload.get("version")), ("issued", payload.get("issued")), ("signer", signer),
            ("verified", verified), ("written", str(out) if out is not None else None)])
    typer.echo("")
    table(["ROOT", "SHA256 THUMBPRINT", "NOT AFTER"],
          [(r.subject.rfc4514_string(), sha256_hex(r), f"{r.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
           for r in roots])
