"""Server settings: `emu server --config server.toml`, every key also `EMU_*`.

Secrets are never defaulted outside `emu demo`: a server started without `secret_key` or a
bootstrap admin token refuses to start (unless `demo = true`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from emu.settings import FileSettings, Section, TlsMqttEndpoint, load_settings
from server.sla.config import SlaSettings


class MqttSettings(TlsMqttEndpoint):
    """The central broker the ingest worker subscribes to (`cert_file`/`key_file`: a client
    certificate, CN `emu-server`, for a broker that requires one)."""

    shared_group: str | None = Field(
        default="emu-ingest", description="shared subscription group; empty to disable"
    )


class HttpSettings(Section):
    """Where the API listens, and its TLS certificate when it serves HTTPS itself.

    Behind a TLS-terminating reverse proxy (deploy/compose.yml) leave the certificate out and
    list the proxy in `forwarded_allow_ips`, so client addresses and the scheme come from its
    X-Forwarded-* headers.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls_cert_file: Path | None = Field(default=None, description="PEM chain: serve HTTPS")
    tls_key_file: Path | None = None
    forwarded_allow_ips: str = Field(
        default="127.0.0.1", description="proxies trusted for X-Forwarded-* (comma list or *)"
    )

    @model_validator(mode="after")
    def _check_tls(self) -> HttpSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for f in (self.tls_cert_file, self.tls_key_file):
            if f is not None and not f.is_file():
                raise ValueError(f"{f}: no such file")
        return self

    @property
    def scheme(self) -> str:
        """`https` when the API serves TLS itself, else `http`."""
        return "https" if self.tls_cert_file else "http"


class StorageSettings(Section):
    """Telemetry retention and rollups."""

    raw_retention_days: float = Field(default=30.0, gt=0)
    rollup_1m_retention_days: float = Field(default=365.0, gt=0)
    rollup_interval_s: float = Field(default=60.0, gt=0)
    retention_step_s: float = Field(default=3600.0, ge=0)
    """Retention walks every series once its cutoff moved this far (rows outlive it by as much)."""


class EnrolmentSettings(Section):
    """What a newly enrolled agent is told about the broker."""

    broker_url: str | None = Field(
        default=None, description="public mqtts:// address agents connect to"
    )
    ca_file: Path | None = None


class CommandSettings(Section):
    """Signed orders to agents (`emu/v1/{site}/cmd`)."""

    key_file: Path | None = Field(
        default=None, description="Ed25519 PEM signing key; default <data_dir>/keys/command.pem, "
        "created on first start")
    ttl_s: float = Field(default=300.0, gt=0, le=7 * 86400, description="default validity")
    redeliver_s: float = Field(default=30.0, gt=0, description="republish unanswered after")


class WebSettings(Section):
    """The dashboard: log-in sessions and live updates."""

    session_max_age_s: int = Field(
        default=8 * 3600, ge=60, description="a log-in expires this long after it was made"
    )
    secure_cookies: bool = Field(
        default=False, description="send the session cookie over HTTPS only (behind TLS)"
    )
    live_interval_s: float = Field(
        default=2.0, gt=0, le=60, description="how often live pages look for changes"
    )


class GatewaySettings(Section):
    """The SSH gateway of remote sessions (role `gateway`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=2222, ge=0, le=65535)
    public_host: str | None = Field(
        default=None, description="the name engineers and agents reach the gateway by")
    host_key_file: Path | None = Field(
        default=None, description="OpenSSH private host key; default <data_dir>/keys/"
        "gateway_host_key, created on first start")
    poll_s: float = Field(default=0.25, gt=0, le=1.5, description="revocation/expiry check")
    claim_s: float = Field(default=1800.0, gt=0, description="approval must be used within")
    onsite_window_s: float = Field(default=4 * 3600.0, gt=0)


class UpgradeSettings(Section):
    """Release packages and rollouts (docs/upgrades.md)."""

    release_keys: tuple[str, ...] = Field(
        default=(), description="trusted release public keys (base64 Ed25519 or PEM); during "
        "a rotation both the old and the new key")
    public_url: str | None = Field(
        default=None, description="base URL agents download packages from (default: the API's "
        "own http://host:port)")
    max_package_mb: float = Field(default=256.0, gt=0)
    download_ttl_s: float = Field(default=7 * 86400.0, gt=0)


class ServerSettings(FileSettings):
    """Everything `emu server` needs."""

    model_config = SettingsConfigDict(
        env_prefix="EMU_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    database_url: str = "sqlite+aiosqlite:///emu-server.db"
    roles: tuple[Literal["api", "ingest", "scheduler", "gateway"], ...] = Field(
        default=("api", "ingest", "scheduler"),
        description="add `gateway` to run the remote-session SSH gateway in this process")
    secret_key: str | None = None
    admin_token: str | None = Field(
        default=None, description="bootstrap token of the first admin (hashed on first start)"
    )
    demo: bool = False
    data_dir: Path = Field(default=Path("emu-data"),
                           description="keys, packages, documents and recordings")
    migrate_on_start: bool = True
    scheduler_tick_s: float = Field(default=5.0, gt=0, le=300)
    mqtt: MqttSettings = MqttSettings()
    http: HttpSettings = HttpSettings()
    storage: StorageSettings = StorageSettings()
    enrolment: EnrolmentSettings = EnrolmentSettings()
    sla: SlaSettings = SlaSettings()
    commands: CommandSettings = CommandSettings()
    web: WebSettings = WebSettings()
    gateway: GatewaySettings = GatewaySettings()
    upgrades: UpgradeSettings = UpgradeSettings()

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in ("sqlite+aiosqlite", "postgresql+psycopg", "postgresql+asyncpg"):
            raise ValueError(
                "use sqlite+aiosqlite:///path.db or postgresql+psycopg://user@host/db"
            )
        return value

    @model_validator(mode="after")
    def _no_default_secrets(self) -> ServerSettings:
        if not self.demo and "api" in self.roles and not self.secret_key:
            raise ValueError("secret_key: required outside `emu demo` (EMU_SECRET_KEY)")
        if self.secret_key is not None and len(self.secret_key) < 16:
            raise ValueError("secret_key: use at least 16 characters")
        return self

    @property
    def command_key_path(self) -> Path:
        """Where the command signing key lives."""
        return self.commands.key_file or self.data_dir / "keys" / "command.pem"

    @property
    def gateway_host_key_file(self) -> Path:
        """The SSH gateway's host key."""
        return self.gateway.host_key_file or self.data_dir / "keys" / "gateway_host_key"

    @property
    def is_sqlite(self) -> bool:
        """SQLite (embedded) rather than PostgreSQL."""
        return self.database_url.startswith("sqlite")


def load_server_settings(path: Path | None, **overrides: object) -> ServerSettings:
    """Settings from `path` and `EMU_*`; emu.settings.ConfigError names bad keys."""
    return load_settings(ServerSettings, path, **overrides)
