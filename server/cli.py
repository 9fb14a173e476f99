"""`emu server`: run the central server (API, ingest, scheduler), or migrate its database."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from emu.settings import ConfigError
from server.broker_auth import broker_passwd_command
from server.core.config import ServerSettings, load_server_settings

app = typer.Typer(
    help="The central server: API, MQTT ingest and scheduler. Without a sub-command, runs it.",
    invoke_without_command=True,
)

app.command("broker-passwd")(broker_passwd_command)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="server.toml (every key also as EMU_*).")
]


def load(config: Path | None, **overrides: object) -> ServerSettings:
    """Settings, or exit 2 with one message per bad key."""
    try:
        return load_server_settings(config, **overrides)
    except ConfigError as exc:
        typer.secho(f"configuration error:\n{exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc


@app.callback()
def run(
    ctx: typer.Context,
    config: ConfigOpt = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (overrides http.port).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the server until SIGTERM or Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    settings = load(config)
    if port is not None:
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update={"port": port})}
        )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.main import ServerProcess

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        proc = ServerProcess(settings)
        runner = asyncio.create_task(proc.run(stop))
        await proc.started.wait()
        if "api" in settings.roles:
            typer.echo(f"api {settings.http.scheme}://{settings.http.host}:{proc.api_port}/api/v1/ "
                       f"(docs /docs, health /healthz, metrics /metrics)")
        typer.echo(f"roles {', '.join(settings.roles)}; database {_redact(settings.database_url)}"
                   f"; broker {settings.mqtt.url}")
        await runner

    asyncio.run(main())


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


@app.command("migrate")
def migrate_cmd(
    config: ConfigOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (Alembic) and exit."""
    from server.core.db import migrate_sync

    settings = load(config, demo=True)  # migrating needs no secrets
    migrate_sync(settings.database_url, revision)
    typer.echo(f"database at {revision}: {_redact(settings.database_url)}")
