"""Root of the `emu` CLI; each component registers its own sub-commands here.

Exit codes follow DESIGN.md: 0 ok, 1 failure, 2 usage (typer's own usage errors are 2 too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="emu",
    help="EMU Remote Service: simulator, site agent, central server and operator verbs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


_registered = False


@app.command("demo")
def demo(
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port of the API.")] = 8080,
    data_dir: Annotated[
        Path, typer.Option(help="Where the demo keeps its SQLite database and spools.")
    ] = Path("emu-demo-data"),
    fault_every: Annotated[
        float, typer.Option(min=5.0, help="Seconds between injected faults.")
    ] = 45.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Everything on one machine: broker, simulator, agents, server; prints URL and log-ins."""
    import asyncio
    import logging
    import signal

    from emu.demo import DemoLogins, run_demo

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pymodbus", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    def ready(url: str, logins: DemoLogins) -> None:
        typer.echo(f"EMU Remote Service demo running at {url}")
        typer.echo(f"  API docs   {url}/docs")
        typer.echo(f"  sites      curl -H 'Authorization: Bearer <token>' {url}/api/v1/sites")
        typer.echo(f"  dashboard  {url}/  (log in with a name and password below)")
        typer.echo("  log-ins (dashboard password, API bearer token):")
        for name, token in logins.tokens.items():
            typer.echo(f"    {name:10} {logins.passwords.get(name, '-'):14} {token}")
        typer.echo(f"  faults are injected every {fault_every:g} s; Ctrl-C stops the demo")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_demo(port, data_dir, stop, fault_every_s=fault_every, ready=ready)

    try:
        asyncio.run(main())
    except OSError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo("demo stopped")


def register() -> None:
    """Attach every component's sub-commands (imported late so `emu --help` stays fast)."""
    global _registered
    if _registered:
        return
    from agent.cli import app as agent_app
    from server.cli import app as server_app
    from simulators.cli import app as sim_app

    app.add_typer(sim_app, name="sim")
    app.add_typer(agent_app, name="agent")
    app.add_typer(server_app, name="server")
    from server.cli_verbs import register as register_verbs

    register_verbs(app)
    from server.upgrades.cli import register as register_upgrades

    register_upgrades(app)
    _registered = True


def main() -> None:
    """Console-script entry point."""
    register()
    app()
