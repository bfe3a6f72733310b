"""Settings: one TOML file plus `TETHER_*` environment variables, validated at start-up.

Precedence (highest first): explicit arguments, environment (`TETHER_HUB__HOSTNAME=…`, nested with
`__`), the TOML file (`$TETHER_CONFIG` or `{data_dir}/tether.toml`), defaults. An invalid value stops
start-up with pydantic's message, which names the setting.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

TlsVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]

# Forward-secret AEAD suites first, then the seed's ECDHE CBC suites, in the seed's order.
DEFAULT_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-RSA-AES256-SHA384",
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-RSA-AES128-SHA256",
    ]
)
DEFAULT_TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"


class Section(BaseModel):
    """A settings table: unknown keys are typos, so they stop start-up."""

    model_config = ConfigDict(extra="forbid")


class HubSettings(Section):
    hostname: str = Field("localhost", description="Host name devices use; part of every token scope.")
    data_dir: Path = Field(Path("tether-data"), description="Where embedded storage and PKI files live.")

    @field_validator("hostname")
    @classmethod
    def _hostname_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/ ;\\") or len(v) > 253:
            raise ValueError("must be a host name (optionally host:port), no '/', ';', spaces")
        return v


class ListenerSettings(Section):
    host: str = Field("0.0.0.0", description="Address every listener binds.")
    mqtt_port: int = Field(8883, ge=0, le=65535, description="MQTT over TLS.")
    mqtt_plain_port: int | None = Field(
        None, ge=0, le=65535, description="Plain-TCP MQTT; only for loopback testing, off by default."
    )
    https_port: int = Field(
        443, ge=0, le=65535,
        description="Service REST API, device HTTPS, MQTT/WS: 443, the port every Microsoft SDK dials.")
    https_fallback_port: int = Field(
        8443, ge=0, le=65535,
        description="Bound instead when this process lacks the privilege for https_port; 0: no fallback.")
    amqp_port: int | None = Field(5671, ge=0, le=65535, description="AMQP 1.0 over TLS (None: off).")


class TlsSettings(Section):
    cert_file: Path | None = Field(None, description="Server certificate (PEM); default {data_dir}/pki.")
    key_file: Path | None = Field(None, description="Server private key (PEM).")
    chain_file: Path | None = Field(None, description="Intermediate chain (PEM), optional.")
    min_version: TlsVersion = Field("TLSv1.2", description="Lowest TLS version; below 1.2 is an opt-in.")
    ciphers: str = Field(DEFAULT_TLS12_CIPHERS, description="TLS 1.2 cipher list (OpenSSL names).")
    tls13_ciphersuites: str = Field(DEFAULT_TLS13_CIPHERSUITES, description="TLS 1.3 suites.")
    request_client_cert: bool = Field(True, description="Ask clients for a certificate (mutual TLS).")


class LimitSettings(Section):
    max_connections: int = Field(100_000, ge=1)
    max_d2c_message_bytes: int = Field(262_144, ge=1, description="Device-to-cloud message size limit.")
    max_mqtt_packet_bytes: int = Field(270_000, ge=1024)
    max_request_body_bytes: int = Field(1_048_576, ge=1024, description="REST body limit (bulk: x16).")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Time a socket gets for its TLS handshake (every listener) and MQTT CONNECT.")
    http_idle_timeout_s: float = Field(
        30.0, gt=0, description="An HTTPS connection with no request in progress (just connected, idle "
        "keep-alive, or half a request head) is closed after this long.")
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the next bytes of a request body (then 408, closed).")
    max_connections_per_peer: int = Field(
        1000, ge=1, description="Sockets one peer address (IPv6: its /64) may hold across all listeners.")
    fd_reserve: int = Field(
        256, ge=16, description="File descriptors kept free of peer sockets for storage, files and pipes.")
    device_messages_per_second: float = Field(100.0, gt=0, description="Per-device telemetry rate limit.")
    sas_clock_skew_s: int = Field(300, ge=0, le=3600, description="Tolerated clock skew for tokens.")
    sas_max_lifetime_s: int = Field(
        366 * 86400, ge=60, description="Tokens expiring further in the future than this are refused."
    )
    auth_failures_per_second: float = Field(50.0, gt=0, description="Per-peer auth failure rate limit.")
    amqp_idle_timeout_s: float = Field(
        240.0, ge=0, le=3600,
        description="AMQP idle time-out the hub announces (0: none); the Python registry manager talks "
                    "only every 120 s, so keep it above 240.")
    amqp_max_frame_bytes: int = Field(65_536, ge=4096, le=1_048_576, description="AMQP max-frame-size.")
    amqp_max_links: int = Field(256, ge=4, le=4096, description="Links one AMQP connection may attach.")


class StorageSettings(Section):
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    stream_url: str | None = Field(None, description="Event stream: file://… (default) or nats://…")
    stream_partitions: int = Field(4, ge=1, le=32)
    stream_retention_hours: float = Field(24.0, gt=0)
    stream_retention_bytes: int = Field(1 << 30, ge=1 << 20)
    stream_reader_processes: int = Field(
        1, ge=0, le=8,
        description="Helper processes that read and render the embedded log for event feeds (0: in the hub).")


class C2DSettings(Section):
    """Cloud-to-device queues (Azure's published defaults)."""

    max_queue_depth: int = Field(50, ge=1, le=5000, description="Messages queued per device.")
    max_delivery_count: int = Field(10, ge=1, le=100, description="Deliveries before dead-lettering.")
    lock_timeout_s: float = Field(60.0, ge=5, le=300, description="How long a received message is locked.")
    default_ttl_s: float = Field(3600.0, gt=0, le=172_800, description="TTL when the sender gives none.")


class AuditSettings(Section):
    """Audit log retention: what is older or beyond the size limit is exported, then deleted."""

    retention_days: float = Field(
        90.0, ge=0, description="Records older than this are exported and deleted; 0 = no age limit.")
    max_records: int = Field(
        1_000_000, ge=0, description="Keep at most this many records (the newest); 0 = no size limit.")
    export_dir: Path | None = Field(
        None, description="Where expired records are written (JSON lines) first; default {data_dir}/audit.")
    retention_interval_s: float = Field(
        3600.0, gt=0, description="How often the hub applies the retention (and once shortly after start).")


class BlobSettings(Section):
    """Blob storage endpoints the hub itself calls (file upload account, import/export container URIs)."""

    ca_file: Path | None = Field(
        None, description="CA bundle (PEM) trusted for blob storage endpoints; default: the system's.")


class FileUploadSettings(Section):
    """Device file upload to blob storage (Azure's `storageEndpoints.$default` and `fileNotifications`).
    Off until `account_name` and `account_key` are set."""

    account_name: str | None = Field(None, description="Storage account name.")
    account_key: str | None = Field(None, description="Storage account key (base64); keep it secret.")
    blob_endpoint: str | None = Field(
        None, description="Blob service URL; default https://{account_name}.blob.core.windows.net "
                          "(Azurite: https://{ip}[:port]/{account_name}).")
    container: str = Field("fileuploads", description="Container the devices upload into.")
    sas_ttl_s: int = Field(3600, ge=60, le=86_400, description="Lifetime of a device's upload SAS.")
    notifications: bool = Field(True, description="Queue a file upload notification for the service.")
    notification_ttl_s: float = Field(3600.0, ge=60, le=172_800, description="Notification time to live.")
    notification_max_delivery_count: int = Field(10, ge=1, le=100,
                                                 description="Deliveries before a notification is dropped.")
    notification_lock_timeout_s: float = Field(60.0, ge=5, le=300, description="Lock of a received batch.")
    max_in_flight: int = Field(10, ge=1, le=100, description="Uploads in flight per device.")

    @field_validator("container")
    @classmethod
    def _container_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}", v):
            raise ValueError("must be a blob container name: 3-63 lower-case letters, digits and '-'")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.account_name and self.account_key)


class JobSettings(Section):
    """Jobs (scheduled twin updates and methods, import/export) and automatic device configurations."""

    concurrency: int = Field(16, ge=1, le=256, description="Devices a running job works on at once.")
    lease_ttl_s: float = Field(15.0, ge=2, le=300,
                               description="Leadership lease: another node takes over this long after "
                                           "the leader stops renewing it.")
    poll_interval_s: float = Field(1.0, gt=0, le=60, description="How often the leader looks for due jobs.")
    retention_days: float = Field(30.0, gt=0, description="Finished jobs are kept this long.")
    configuration_sweep_s: float = Field(
        300.0, ge=1, description="Every configuration is re-evaluated against every twin this often "
                                 "(twin changes are reconciled at once).")


class ClusterSettings(Section):
    nats_url: str | None = Field(
        None, description="NATS server the hub nodes signal each other through; unset = single node."
    )
    node_id: str | None = Field(None, description="This node's id in the cluster; default hostname-pid.")
    subject_prefix: str = Field(
        "tether", description="Prefix of the cluster's NATS subjects and KV buckets (one per cluster)."
    )

    @field_validator("nats_url")
    @classmethod
    def _nats_url_ok(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("nats://", "tls://")):
            raise ValueError("must be a nats:// or tls:// URL")
        return v

    @field_validator("node_id")
    @classmethod
    def _node_id_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v):
            raise ValueError("must be 1-64 letters, digits, '_' or '-'")
        return v

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", v):
            raise ValueError("must be 1-32 letters, digits, '_' or '-'")
        return v


class ClaimRole(Section):
    """A token claim value (an app role or a group id) that grants a role, optionally scoped."""

    value: str = Field(description="Value of the provider's roles/groups claim, e.g. `Tether.Owner`.")
    role: str = Field(description="Owner | DataContributor | DataReader | RegistryContributor | "
                                  "TwinContributor (Azure's display names are accepted).")
    scope: str | None = Field(None, description="Query condition limiting the role to matching devices, "
                                                "e.g. `tags.site = 'plant-1'`.")

    @field_validator("role")
    @classmethod
    def _role_ok(cls, v: str) -> str:
        from tether.security.roles import parse_role

        return parse_role(v).value


class OidcProviderSettings(Section):
    """One OpenID Connect provider (Entra ID, Keycloak, Auth0, Dex, …); see docs/security.md."""

    name: str = Field(description="Short name shown on the console's sign-in page and in URLs.")
    issuer: str = Field(description="Exact `iss` of its tokens; discovery is {issuer}/.well-known/"
                                    "openid-configuration.")
    audience: list[str] = Field(default_factory=list, description="Accepted `aud` values of bearer tokens "
                                "for the REST API (the client id is accepted for console sign-in).")
    client_id: str | None = Field(None, description="Console sign-in (authorization code + PKCE).")
    client_secret: str | None = Field(None, description="Only for confidential clients; a secret.")
    scopes: str = Field("openid profile email", description="Scopes requested at console sign-in.")
    roles_claim: str = Field("roles", description="Claim holding app roles or groups (dotted path, e.g. "
                             "`realm_access.roles` for Keycloak).")
    claim_roles: list[ClaimRole] = Field(default_factory=list, description="Claim values → roles.")
    subject_claim: str = Field("sub", description="Claim naming the person (`oid` on Entra ID).")
    name_claim: str = Field("preferred_username", description="Claim shown as the display name.")
    clock_skew_s: int = Field(60, ge=0, le=600, description="Tolerance on exp / nbf / iat.")
    jwks_cache_s: int = Field(3600, ge=60, description="JWKS is re-read at least this often.")
    jwks_min_refresh_s: float = Field(60.0, ge=0, description="An unknown `kid` re-reads the JWKS at "
                                      "most this often (bounds what forged tokens can make us fetch).")
    ca_file: Path | None = Field(None, description="CA bundle for a provider with a private CA.")
    allow_http: bool = Field(False, description="Plain-HTTP discovery; accepted only for loopback "
                             "issuers (tests).")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", v):
            raise ValueError("must be 1-32 letters, digits, '_' or '-'")
        return v

    @field_validator("issuer")
    @classmethod
    def _issuer_ok(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")) or len(v) > 512:
            raise ValueError("must be an https:// URL")
        return v


class OperatorSettings(Section):
    """People who operate the hub: OIDC providers, local operators, console sessions."""

    oidc: list[OidcProviderSettings] = Field(default_factory=list)
    console: bool = Field(True, description="Serve the web console at /console on the HTTPS listener.")
    session_ttl_s: int = Field(8 * 3600, ge=300, le=7 * 86400, description="Console session lifetime.")
    lockout_threshold: int = Field(5, ge=1, le=100, description="Failed sign-ins before a lockout.")
    lockout_s: int = Field(900, ge=10, le=86400, description="How long a locked-out operator waits.")
    public_url: str | None = Field(None, description="The console's external base URL (e.g. "
                                   "https://hub.example.com:8443) for OIDC redirect URIs; default: "
                                   "from the request's Host.")
    cookie_secure: bool = Field(True, description="Mark cookies Secure (HTTPS only); off only for tests "
                                "over plain HTTP on loopback.")

    @field_validator("oidc")
    @classmethod
    def _unique(cls, v: list[OidcProviderSettings]) -> list[OidcProviderSettings]:
        for attr in ("name", "issuer"):
            values = [getattr(p, attr) for p in v]
            if len(values) != len(set(values)):
                raise ValueError(f"each provider needs its own {attr}")
        for p in v:
            if p.issuer.startswith("http://") and not (p.allow_http and _loopback_url(p.issuer)):
                raise ValueError(f"provider {p.name}: the issuer must be https:// (plain HTTP only with "
                                 "allow_http on a loopback address)")
        return v


def _loopback_url(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """All of Tether's settings. Sections map to TOML tables and `TETHER_{SECTION}__{KEY}` variables."""

    model_config = SettingsConfigDict(env_prefix="TETHER_", env_nested_delimiter="__", extra="forbid")

    hub: HubSettings = HubSettings()
    listeners: ListenerSettings = ListenerSettings()
    tls: TlsSettings = TlsSettings()
    limits: LimitSettings = LimitSettings()
    storage: StorageSettings = StorageSettings()
    c2d: C2DSettings = C2DSettings()
    audit: AuditSettings = AuditSettings()
    cluster: ClusterSettings = ClusterSettings()
    blob: BlobSettings = BlobSettings()
    file_upload: FileUploadSettings = FileUploadSettings()
    jobs: JobSettings = JobSettings()
    operators: OperatorSettings = OperatorSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("TETHER_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
        return tuple(sources)

    # Derived locations -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.hub.data_dir

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite+aiosqlite:///{self.data_dir.resolve()}/tether.db"

    @property
    def stream_url(self) -> str:
        return self.storage.stream_url or f"file://{self.data_dir.resolve()}/stream"

    @property
    def audit_export_dir(self) -> Path:
        return self.audit.export_dir or self.data_dir / "audit"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def cert_file(self) -> Path:
        return self.tls.cert_file or self.pki_dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.tls.key_file or self.pki_dir / "server.key"

    @property
    def legacy_tls(self) -> bool:
        return self.tls.min_version in ("TLSv1", "TLSv1.1")


class ConfigError(Exception):
    """Start-up stops with this; the message names each bad setting."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            lines.append(f"invalid setting {name}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc


def environment_settings() -> dict[str, list[str]]:
    """Which settings the `TETHER_*` environment sets: `{section: [key, …]}` (values are read from
    validated `Settings`, so they carry their types)."""
    found = EnvSettingsSource(Settings, env_prefix="TETHER_", env_nested_delimiter="__")()
    return {section: sorted(keys) for section, keys in found.items()
            if isinstance(keys, dict) and section in Settings.model_fields}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML escapes)


def render_toml(sections: Mapping[str, Mapping[str, Any]], *, header: str = "") -> str:
    """A settings file: one table per section, scalar values only (every setting is a scalar); keys
    whose value is None are left out (None means "default")."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section, values in sections.items():
        present = {k: v for k, v in values.items() if v is not None}
        if not present:
            continue
        lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in present.items()]
    return "\n".join(lines) + "\n"
