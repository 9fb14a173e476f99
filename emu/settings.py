"""Loading a process's settings: one TOML file, every key overridable by environment variables.

Agent and server each have one pydantic-settings class; this module gives them the same
precedence (init > environment > TOML > defaults) and the same error: one message per bad key,
naming the file or the variable, which the CLI turns into exit 2.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

S = TypeVar("S", bound=BaseSettings)


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad key."""


class Section(BaseModel):
    """A table of a settings file: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttEndpoint(Section):
    """A broker address (`mqtt://` or `mqtts://` for TLS) and its credentials."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError("must look like mqtt://host[:port] or mqtts://host[:port]")
        return value

    @property
    def host(self) -> str:
        """Broker host name."""
        return urlparse(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Broker port (1883, or 8883 for mqtts)."""
        url = urlparse(self.url)
        return url.port or (8883 if url.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        """Whether to use TLS."""
        return urlparse(self.url).scheme == "mqtts"


class TlsMqttEndpoint(MqttEndpoint):
    """A central broker: the CA that signed its certificate, and a client certificate when
    the broker requires one (`mqtts://`; agent and server ingest alike)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for f in (self.ca_file, self.cert_file, self.key_file):
            if f is not None and not f.is_file():
                raise ValueError(f"{f}: no such file")
        return self


class FileSettings(BaseSettings):
    """Base of every process's settings: init > `EMU_*` environment > TOML file > defaults."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then the environment, then the TOML file named in model_config."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _where(settings_cls: type[BaseSettings], loc: tuple[Any, ...], path: Path | None) -> str:
    key = ".".join(str(p) for p in loc) or "(top level)"
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    delim = str(settings_cls.model_config.get("env_nested_delimiter") or "__")
    env_name = (prefix + delim.join(str(p) for p in loc if not isinstance(p, int))).upper()
    top_env = (prefix + str(loc[0])).upper() if loc else ""
    if env_name in os.environ or top_env in os.environ:
        return f"${env_name if env_name in os.environ else top_env} ({key})"
    return f"{path}: {key}" if path else key


def load_settings(settings_cls: type[S], path: Path | None, **overrides: Any) -> S:
    """Build settings from `path` (TOML) and the environment; ConfigError names each bad key."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file")
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    bound = type(
        settings_cls.__name__,
        (settings_cls,),
        {"model_config": SettingsConfigDict(**{**settings_cls.model_config, "toml_file": path})},
    )
    try:
        return bound(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling)"
            if not err["loc"]:  # a cross-field check names its key itself
                lines.append(f"{path}: {msg}" if path else msg)
                continue
            lines.append(f"{_where(settings_cls, tuple(err['loc']), path)}: {msg}")
        raise ConfigError("\n".join(lines)) from exc
