"""`emu agent`: run the site agent, check its configuration, show its health."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from agent.config import AgentSettings, load_agent_settings
from agent.enrol import enrol_command
from agent.errors import AgentError
from emu.settings import ConfigError

app = typer.Typer(
    help="The site agent: polls EMU units, spools on disk, uplinks to the central broker. "
    "Without a sub-command, runs the agent.",
    invoke_without_command=True,
)

app.command("enrol")(enrol_command)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="agent.toml (every key also as EMU_AGENT_*)."),
]


def _load(config: Path | None) -> AgentSettings:

    try:
        return load_agent_settings(config)
    except ConfigError as exc:
        typer.secho(f"configuration error:\n{exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc


@app.callback()
def run(
    ctx: typer.Context,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _load(config)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    from agent.service import Agent

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(settings)
        typer.echo(f"agent {settings.agent} for site {settings.site}: "
                   f"{len(settings.devices)} device(s), broker {settings.broker.url}, "
                   f"spool {settings.spool_path}")
        await agent.run_forever(stop)

    try:
        asyncio.run(main())
    except AgentError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc


@app.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate the configuration and the device profiles, then exit."""
    from protocols.errors import ProfileError
    from protocols.profiles import load_profile

    settings = _load(config)
    for dev in settings.devices:
        if dev.profile != "sunspec":
            try:
                load_profile(dev.profile)
            except ProfileError as exc:
                typer.secho(f"configuration error:\ndevices.{dev.name}.profile: {exc}",
                            err=True, fg=typer.colors.RED)
                raise typer.Exit(2) from exc
    typer.echo(f"ok: site {settings.site}, {len(settings.devices)} device(s)")


@app.command("status")
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the running agent's health (from the file it writes in its state directory)."""
    from agent.service import HEALTH_FILE, read_health

    settings = _load(config)
    try:
        h = read_health(settings.state_dir)
    except FileNotFoundError as exc:
        typer.secho(f"no {HEALTH_FILE} in {settings.state_dir}: is the agent running?",
                    err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(h, indent=2))
        return
    up, sp = h["uplink"], h["spool"]
    typer.echo(f"agent {h['agent']} site {h['site']} v{h['version']} at {h['ts']}")
    typer.echo(f"  {h['points_per_s']} points/s, uplink "
               f"{'connected' if up['connected'] else 'DISCONNECTED'}, "
               f"{up['reconnects']} reconnects")
    typer.echo(f"  spool {sp['batches']} batches / {sp['points']} points, oldest {sp['age_s']} s,"
               f" dropped {sp['dropped_points']}")
    for name, d in h["devices"].items():
        state = "COMM LOST" if d.get("comm_lost") else "ok"
        typer.echo(f"  {name:16} {state:9} cycles {d.get('cycles', 0)} timeouts "
                   f"{d.get('timeouts', 0)} exceptions {d.get('exceptions', 0)} "
                   f"malformed {d.get('malformed', 0)}")


@app.command("approve")
def approve(
    session: Annotated[str | None, typer.Argument(help="session id; without it: list the "
                                                  "sessions waiting here")] = None,
    config: ConfigOpt = None,
    technician: Annotated[str | None, typer.Option("--name", help="who approves (default: "
                                                   "your login name)")] = None,
) -> None:
    """On-site approval of a remote session (sites whose policy says `approval = "onsite"`)."""
    from datetime import UTC, datetime

    from agent.sessions import LocalApprovalError, approve_locally, list_pending

    settings = _load(config)
    if session is None:
        pending = list_pending(settings)
        if not pending:
            typer.echo("no session is waiting for approval on this gateway")
        for item in pending:
            typer.echo(f"{item['session']}  ticket {item.get('ticket', '-')}  scope "
                       f"{json.dumps(item['scope'])}  until {item['claim_by']}\n"
                       f"    reason: {item.get('reason', '-')}")
        return
    try:
        info = approve_locally(settings, session, technician, now=datetime.now(UTC))
    except LocalApprovalError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(f"approved {session} (scope {json.dumps(info['scope'])}); the agent reports "
               "the approval and opens the tunnel")
