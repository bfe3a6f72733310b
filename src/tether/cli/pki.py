"""`tether pki …` (dev certificates on disk) and `tether ca …` (the hub's registered device CAs).

Both work on the local data dir only: CA private keys never travel over the REST API. CA key pairs
made here live in `{data_dir}/pki/cas/NAME.pem|.key`; the name `root` means the dev root CA.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tether.cli.backend import LOCAL_ACTOR
from tether.cli.context import cli_errors, run, state_of
from tether.cli.local import LocalServices
from tether.cli.output import table
from tether.config import Settings
from tether.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from tether.security.x509 import CaService

    _CaFn = Callable[[CaService], Awaitable[str]]

pki_app = typer.Typer(help="Development PKI files: root CA, server, device and proof certificates, CRLs "
                      "(local mode only).")
ca_app = typer.Typer(help="Device CAs trusted by the hub for certificateAuthority devices (local mode only).")

ROOT = "root"
CaName = Annotated[str, typer.Argument(help="CA name.")]


# --- helpers -------------------------------------------------------------------------------------


def _bare_host(hostname: str) -> str:
    """`host:port` → `host` (IPv6 literals in brackets lose the brackets)."""
    if hostname.startswith("["):
        return hostname[1:].split("]", 1)[0]
    return hostname.rsplit(":", 1)[0] if hostname.count(":") == 1 else hostname


_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME_RE = re.compile(rf"^(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")


def parse_san(value: str) -> tuple[str | None, str | None]:
    """`--san` value → (DNS name, None) or (None, IP); IPv6 may be bracketed; `*.` wildcards allowed."""
    text = value.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return None, str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if len(text) > 253 or not _DNS_NAME_RE.fullmatch(text):
        raise BadRequest(f"--san {value!r} is neither a host name nor an IP address", field="san")
    return text.lower(), None


def server_sans(hostname: str, extra: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Server certificate names: the hub host name, `localhost`, `127.0.0.1`, then each `extra`."""
    host = _bare_host(hostname)
    names, ips = ["localhost"], ["127.0.0.1"]
    try:
        ipaddress.ip_address(host)
        ips.insert(0, host)
    except ValueError:
        names.insert(0, host)
    for value in extra:
        name, ip = parse_san(value)
        if name is not None:
            names.append(name)
        if ip is not None:
            ips.append(ip)
    return list(dict.fromkeys(names)), list(dict.fromkeys(ips))


def init_dev_pki(settings: Settings, extra_sans: Sequence[str] = ()) -> Path:
    """`pki.init_pki` for this hub's names; returns the root CA certificate path.

    With `extra_sans` the server certificate gets exactly the default names plus these (re-issued when
    its names differ); without, an existing certificate covering the defaults is kept as it is, extra
    names included, so a plain `tether init` never drops names added with `--san`."""
    from tether.security.pki import init_pki

    names, ips = server_sans(settings.hub.hostname, extra_sans)
    return init_pki(settings.pki_dir, names, ips, exact=bool(extra_sans)).root_cert


def ca_files(settings: Settings, name: str) -> tuple[Path, Path]:
    """Certificate and key paths of a CA this CLI can sign with."""
    if name == ROOT:
        return settings.pki_dir / "root-ca.pem", settings.pki_dir / "root-ca.key"
    if not name or any(c in name for c in "/\\ \t") or name.startswith("."):
        raise BadRequest(f"invalid CA name {name!r}", field="ca")
    return settings.pki_dir / "cas" / f"{name}.pem", settings.pki_dir / "cas" / f"{name}.key"


def load_ca(settings: Settings, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from tether.security.pki import load_certificate, load_private_key

    cert_path, key_path = ca_files(settings, name)
    if not (cert_path.is_file() and key_path.is_file()):
        hint = "run `tether pki init`" if name == ROOT else f"create it with `tether pki ca-cert {name}`"
        raise NotFound(
            f"no CA key pair {name!r} ({cert_path}, {key_path}); {hint}", code="CertificateNotFound"
        )
    return load_certificate(cert_path), load_private_key(key_path)


def parse_serial(text: str) -> int:
    """Certificate serials in hex (as `device-cert` prints them); `0x` prefix and `:` allowed."""
    clean = text.strip().replace(":", "").lower().removeprefix("0x")
    try:
        value = int(clean, 16)
    except ValueError:
        raise BadRequest(f"serial {text!r} is not hexadecimal", field="revoke") from None
    if value <= 0:
        raise BadRequest(f"serial {text!r} must be positive", field="revoke")
    return value


def _local(ctx: typer.Context, what: str) -> Settings:
    with cli_errors():
        return state_of(ctx).require_local(what)


def _ca_service(services: LocalServices) -> CaService:
    from tether.security.x509 import CaService
    from tether.storage.sql.cas import SqlCaRepository

    return CaService(SqlCaRepository(services.storage.db.engine), services.audit)


# --- tether pki ----------------------------------------------------------------------------------


@pki_app.command("init")
def pki_init(
    ctx: typer.Context,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", metavar="NAME_OR_IP", show_default=False,
                     help="Extra server certificate name or IP (repeatable). Given: the certificate has "
                          "exactly the defaults plus these, re-issued when that set changes."),
    ] = None,
) -> None:
    """Create (or keep) the dev root CA and the hub's server certificate in {data_dir}/pki.

    The server certificate names the hub host name, localhost and 127.0.0.1, plus every --san."""
    settings = _local(ctx, "pki init")

    async def body() -> list[str]:
        from cryptography.x509 import DNSName, IPAddress, SubjectAlternativeName

        from tether.security.pki import load_certificate

        root = init_dev_pki(settings, san or ())
        server = settings.pki_dir / "server.pem"
        sans = load_certificate(server).extensions.get_extension_for_class(SubjectAlternativeName).value
        names = [*sans.get_values_for_type(DNSName), *map(str, sans.get_values_for_type(IPAddress))]
        return [f"root CA: {root}", f"server certificate: {server}", f"server names: {', '.join(names)}"]

    for line in run(body):
        typer.echo(line)


@pki_app.command("ca-cert")
def pki_ca_cert(
    ctx: typer.Context,
    name: CaName,
    days: Annotated[float, typer.Option("--days", min=1, help="Validity in days.")] = 1826,
) -> None:
    """Create an intermediate device CA signed by the dev root, in {data_dir}/pki/cas/NAME.pem|.key.

    Register it afterwards with `tether ca add NAME {data_dir}/pki/cas/NAME.pem`."""
    settings = _local(ctx, "pki ca-cert")

    async def body() -> Path:
        from tether.security.pki import issue_intermediate_ca, write_certificates, write_private_key

        if name == ROOT:
            raise BadRequest("'root' is the dev root CA; pick another name", field="name")
        cert_path, key_path = ca_files(settings, name)
        if cert_path.exists() or key_path.exists():
            raise BadRequest(f"CA {name!r} already exists ({cert_path})", code="CertificateAlreadyExists")
        root_cert, root_key = load_ca(settings, ROOT)
        cert, key = issue_intermediate_ca(f"Tether Device CA {name}", root_cert, root_key, days=days)
        write_private_key(key_path, key)
        write_certificates(cert_path, [cert])
        return cert_path

    typer.echo(f"CA certificate: {run(body)}")


@pki_app.command("device-cert")
def pki_device_cert(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id (becomes the certificate CN).")],
    ca: Annotated[
        str | None, typer.Option("--ca", help="Sign with this CA (`root` or a `pki ca-cert` name).")
    ] = None,
    self_signed: Annotated[
        bool, typer.Option("--self-signed", help="Self-signed certificate (the default).")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory (default: the current directory; device keys do not "
                     "belong in the hub's data dir).", show_default=False),
    ] = None,
    days: Annotated[float, typer.Option("--days", min=1, help="Validity in days.")] = 365,
) -> None:
    """Issue a device certificate: writes ID.pem (certificate chain) and ID.key; prints the thumbprints."""
    settings = _local(ctx, "pki device-cert")

    async def body() -> list[str]:
        from tether.registry.models import validate_device_id
        from tether.security.pki import issue_device_cert, thumbprints, write_certificates, write_private_key

        validate_device_id(device_id)
        if ca is not None and self_signed:
            raise BadRequest("give either --ca NAME or --self-signed, not both", field="ca")
        directory = out if out is not None else Path.cwd()
        if ca is None:
            cert, key = issue_device_cert(device_id, self_signed=True, days=days)
            chain = [cert]
        else:
            ca_cert, ca_key = load_ca(settings, ca)
            cert, key = issue_device_cert(device_id, ca_cert=ca_cert, ca_key=ca_key, days=days)
            # Include an intermediate so the hub can build the path to a registered root.
            chain = [cert] if ca_cert.issuer == ca_cert.subject else [cert, ca_cert]
        cert_path, key_path = directory / f"{device_id}.pem", directory / f"{device_id}.key"
        write_private_key(key_path, key)
        write_certificates(cert_path, chain)
        sha1, sha256 = thumbprints(cert)
        return [
            f"certificate: {cert_path}",
            f"private key: {key_path}",
            f"serial: {cert.serial_number:X}",
            f"SHA-1 thumbprint: {sha1}",
            f"SHA-256 thumbprint: {sha256}",
        ]

    for line in run(body):
        typer.echo(line)


@pki_app.command("proof-cert")
def pki_proof_cert(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="CA key pair that signs the proof (`root` or a ca-cert name).")],
    code: Annotated[str, typer.Argument(help="Verification code from `tether ca add`/`verification-code`.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Proof file (default {data_dir}/pki/NAME-proof.pem).")
    ] = None,
) -> None:
    """Write a proof-of-possession certificate (CN = CODE, signed by the CA) for `tether ca verify`."""
    settings = _local(ctx, "pki proof-cert")

    async def body() -> Path:
        from tether.security.pki import issue_verification_cert, write_certificates

        ca_cert, ca_key = load_ca(settings, name)
        cert, _ = issue_verification_cert(code, ca_cert, ca_key)
        path = out if out is not None else settings.pki_dir / f"{name}-proof.pem"
        write_certificates(path, [cert])
        return path

    typer.echo(f"proof certificate: {run(body)}")


@pki_app.command("crl")
def pki_crl(
    ctx: typer.Context,
    ca: Annotated[str, typer.Option("--ca", help="CA that signs the CRL (`root` or a ca-cert name).")],
    revoke: Annotated[
        list[str], typer.Option("--revoke", help="Hex serial to revoke (repeatable).", show_default=False)
    ],
    days: Annotated[float, typer.Option("--days", min=1, help="Days until nextUpdate.")] = 7,
) -> None:
    """Write a CRL for a CA ({data_dir}/pki/…crl.pem) and attach it to the registered CA of that name."""
    settings = _local(ctx, "pki crl")

    async def body() -> list[str]:
        from cryptography.hazmat.primitives.serialization import Encoding

        from tether.security.pki import make_crl

        serials = [parse_serial(s) for s in revoke]
        ca_cert, ca_key = load_ca(settings, ca)
        crl = make_crl(ca_cert, ca_key, serials, days=days)
        cert_path, _ = ca_files(settings, ca)
        path = cert_path.with_name(cert_path.stem + ".crl.pem")
        pem = crl.public_bytes(Encoding.PEM)
        path.write_bytes(pem)
        lines = [f"CRL: {path} ({len(serials)} revoked)"]
        services = LocalServices(settings)
        services.check_data_dir()
        await services.open(ensure_defaults=False)
        try:
            cas = _ca_service(services)
            try:
                await cas.set_crl(ca, pem, actor=LOCAL_ACTOR)
                lines.append(f"attached to registered CA {ca}")
            except NotFound:
                lines.append(f"no registered CA named {ca}: register it with `tether ca add`")
        finally:
            await services.close()
        return lines

    for line in run(body):
        typer.echo(line)


# --- tether ca -----------------------------------------------------------------------------------


async def _with_cas(settings: Settings, fn: _CaFn) -> str:
    services = LocalServices(settings)
    services.check_data_dir()
    await services.open(ensure_defaults=False)
    try:
        return await fn(_ca_service(services))
    finally:
        await services.close()


@ca_app.command("add")
def ca_add(
    ctx: typer.Context,
    name: CaName,
    cert: Annotated[Path, typer.Argument(help="CA certificate (PEM).")],
    verified: Annotated[
        bool, typer.Option("--verified", help="Trust at once, without proof of possession.")
    ] = False,
) -> None:
    """Register a device CA; prints the verification code for the proof of possession."""
    settings = _local(ctx, "ca add")

    async def fn(cas: CaService) -> str:
        record = await cas.add(name, cert.read_bytes(), verified=verified, actor=LOCAL_ACTOR)
        if record.verified:
            return f"CA {name} registered and verified (thumbprint {record.thumbprint})"
        assert record.verification_code is not None
        return record.verification_code

    typer.echo(run(lambda: _with_cas(settings, fn)))


@ca_app.command("list")
def ca_list(ctx: typer.Context) -> None:
    """List registered CAs with thumbprint, verification state and CRL presence."""
    settings = _local(ctx, "ca list")
    rows: list[tuple[str, ...]] = []

    async def fn(cas: CaService) -> str:
        for r in await cas.list():
            rows.append((r.name, r.thumbprint, "yes" if r.verified else "no", "yes" if r.crl_pem else "no",
                         r.updated.isoformat(timespec="seconds")))
        return ""

    run(lambda: _with_cas(settings, fn))
    table(["NAME", "THUMBPRINT (SHA-1)", "VERIFIED", "CRL", "UPDATED"], rows)


@ca_app.command("verify")
def ca_verify(
    ctx: typer.Context,
    name: CaName,
    proof: Annotated[Path, typer.Argument(help="Proof certificate (PEM): CN = code, signed by the CA.")],
) -> None:
    """Complete proof of possession; the CA becomes trusted for device authentication."""
    settings = _local(ctx, "ca verify")

    async def fn(cas: CaService) -> str:
        await cas.verify(name, proof.read_bytes(), actor=LOCAL_ACTOR)
        return f"CA {name} verified"

    typer.echo(run(lambda: _with_cas(settings, fn)))


@ca_app.command("verification-code")
def ca_verification_code(ctx: typer.Context, name: CaName) -> None:
    """Print a new verification code for NAME (earlier codes stop working)."""
    settings = _local(ctx, "ca verification-code")

    async def fn(cas: CaService) -> str:
        return await cas.verification_code(name, actor=LOCAL_ACTOR)

    typer.echo(run(lambda: _with_cas(settings, fn)))


@ca_app.command("remove")
def ca_remove(ctx: typer.Context, name: CaName) -> None:
    """Remove a registered CA; devices it signed can no longer authenticate."""
    settings = _local(ctx, "ca remove")

    async def fn(cas: CaService) -> str:
        await cas.remove(name, actor=LOCAL_ACTOR)
        return f"removed CA {name}"

    typer.echo(run(lambda: _with_cas(settings, fn)))
