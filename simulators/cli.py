"""`emu sim`: placeholder until the simulator lands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Simulated EMU units over Modbus TCP.", no_args_is_help=True)


@app.command("faults")
def faults() -> None:
    """List the fault names that can be injected."""
