"""Root of the `emu` CLI; each component registers its own sub-commands here.

Exit codes follow DESIGN.md: 0 ok, 1 failure, 2 usage (typer's own usage errors are 2 too).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="emu",
    help="EMU Remote Service: simulator, site agent, central server and operator verbs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


_registered = False


def register() -> None:
    """Attach every component's sub-commands (imported late so `emu --help` stays fast)."""
    global _registered
    if _registered:
        return
    from agent.cli import app as agent_app
    from simulators.cli import app as sim_app

    app.add_typer(sim_app, name="sim")
    app.add_typer(agent_app, name="agent")
    _registered = True


def main() -> None:
    """Console-script entry point."""
    register()
    app()
