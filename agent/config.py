"""Agent settings: one TOML file (`emu agent --config agent.toml`), every key also `EMU_AGENT_*`.

Nested keys use `__` in the environment (`EMU_AGENT_BROKER__URL`); `devices` takes JSON
there. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from emu.settings import FileSettings, MqttEndpoint, Section, TlsMqttEndpoint, load_settings
from protocols.errors import SignatureError, TopicError
from protocols.signing import load_public_key, load_public_keys
from protocols.topics import validate_site


class BrokerSettings(TlsMqttEndpoint):
    """The central broker: `mqtt://` or `mqtts://` (TLS), credentials, client certificate."""

    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)


class UplinkSettings(Section):
    """Batching and publishing."""

    batch_max_points: int = Field(default=1000, ge=1, le=100_000)
    batch_max_age_s: float = Field(default=0.5, gt=0, le=300)
    compress: bool = False
    max_inflight: int = Field(default=50, ge=1, le=1000)
    health_interval_s: float = Field(default=30.0, gt=0)


class SpoolSettings(Section):
    """Store-and-forward on disk."""

    path: Path = Path("emu-agent-spool.db")
    max_mb: float = Field(default=256.0, gt=0)


class DeviceSettings(Section):
    """One unit: where it is, how to talk to it, what it is."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    protocol: Literal["modbus-tcp", "modbus-rtu", "mqtt"]
    profile: str = Field(description="a shipped series (EMU-BS), a profile file, or 'sunspec'")
    host: str | None = None
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=247)
    serial_port: str | None = None
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    topic: str | None = None
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    timeout_s: float = Field(default=1.0, gt=0, le=60)
    retries: int = Field(default=1, ge=0, le=10)
    comm_loss_after: int = Field(default=3, ge=1, le=100, description="failed cycles")
    max_gap: int | None = Field(default=None, ge=0, le=120)

    @model_validator(mode="after")
    def _check_protocol(self) -> DeviceSettings:
        if self.protocol == "modbus-tcp" and not self.host:
            raise ValueError("a modbus-tcp device needs host")
        if self.protocol == "modbus-rtu" and not self.serial_port:
            raise ValueError("a modbus-rtu device needs serial_port")
        if self.protocol == "mqtt" and not self.topic:
            raise ValueError("an mqtt device needs topic")
        if self.protocol == "mqtt" and self.profile == "sunspec":
            raise ValueError("sunspec discovery needs a Modbus device")
        return self


class CommandSettings(Section):
    """Who may give this agent orders: the server's command public keys (Ed25519).

    `server_key` is written by `emu agent enrol`; `extra_server_keys` holds a second key
    during a rotation. With no key at all, every command is refused.
    """

    server_key: str | None = None
    extra_server_keys: tuple[str, ...] = ()

    @field_validator("server_key", "extra_server_keys")
    @classmethod
    def _check_keys(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        for text in (value,) if isinstance(value, str) else value or ():
            try:
                load_public_key(text)
            except SignatureError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @property
    def trusted(self) -> tuple[str, ...]:
        """Every key a command may be signed with."""
        return ((self.server_key,) if self.server_key else ()) + self.extra_server_keys


class AgentUpgradeSettings(Section):
    """Upgrade packages: the release public keys this gateway trusts (docs/upgrades.md).

    Two keys during a rotation; with none, every upgrade job is refused.
    """

    release_keys: tuple[str, ...] = ()

    @field_validator("release_keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            load_public_keys(value, "upgrades.release_keys")
        except SignatureError as exc:
            raise ValueError(str(exc)) from exc
        return value


class LocalMqttSettings(MqttEndpoint):
    """The site-local broker that MQTT-native units publish to (plain MQTT on the LAN)."""

    @field_validator("url")
    @classmethod
    def _plain_only(cls, value: str) -> str:
        if not value.startswith("mqtt://"):
            raise ValueError("the site-local broker takes mqtt://host[:port] (no TLS)")
        return value


class SessionSettings(Section):
    """Remote sessions: the SSH gateway (address and host key pinned at enrolment), the shell.

    The agent dials the gateway outbound and listens on no port. The shell an engineer gets is
    `shell` (a restricted shell by default; point it at `sudo -u <account> rbash` or similar
    to run it as a dedicated account); `max_duration_s` caps any session on the agent's side.
    """

    gateway: str | None = Field(default=None, description="host:port of the SSH gateway")
    gateway_host_key: str | None = Field(default=None, description="pinned OpenSSH host key")
    key_file: Path = Path("emu-agent-ssh-key")
    shell: tuple[str, ...] = ("/bin/rbash", "--noprofile", "--norc")
    max_duration_s: int = Field(default=8 * 3600, gt=0)
    check_interval_s: float = Field(default=0.25, gt=0, le=10)
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("gateway")
    @classmethod
    def _check_gateway(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("use host:port")
        return value

    @field_validator("shell")
    @classmethod
    def _check_shell(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name the shell program")
        return value


class AgentSettings(FileSettings):
    """Everything `emu agent` needs."""

    model_config = SettingsConfigDict(
        env_prefix="EMU_AGENT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    site: str
    agent_id: str | None = None
    state_dir: Path = Path(".")
    broker: BrokerSettings = BrokerSettings()
    uplink: UplinkSettings = UplinkSettings()
    spool: SpoolSettings = SpoolSettings()
    local_mqtt: LocalMqttSettings = LocalMqttSettings()
    commands: CommandSettings = CommandSettings()
    sessions: SessionSettings = SessionSettings()
    upgrades: AgentUpgradeSettings = AgentUpgradeSettings()
    devices: tuple[DeviceSettings, ...] = ()

    @field_validator("site")
    @classmethod
    def _check_site(cls, value: str) -> str:
        try:
            return validate_site(value)
        except TopicError as exc:  # pydantic reports ValueErrors with the key
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _check_devices(self) -> AgentSettings:
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"devices: duplicate name {', '.join(dupes)}")
        return self

    @property
    def agent(self) -> str:
        """The agent's id in every message (defaults to the site id)."""
        return self.agent_id or self.site

    def state_path(self, path: Path) -> Path:
        """`path`, relative paths under `state_dir`."""
        return path if path.is_absolute() else self.state_dir / path

    @property
    def spool_path(self) -> Path:
        """Spool file, relative paths under `state_dir`."""
        path = self.spool.path
        return path if path.is_absolute() else self.state_dir / path


def load_agent_settings(path: Path | None) -> AgentSettings:
    """Settings from `path` and the environment; emu.settings.ConfigError names bad keys."""
    return load_settings(AgentSettings, path)
