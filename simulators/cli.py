"""`emu sim`: run simulated EMU units, and steer a running simulator from another shell."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer

from protocols.errors import FirmwareImageError, ProfileError
from protocols.firmware import FirmwareImage
from protocols.profiles import load_profile, shipped_profiles
from simulators.control import DEFAULT_CONTROL_PORT, ControlServer, request
from simulators.errors import SimulatorError
from simulators.faults import FAULTS
from simulators.serial import DEFAULT_BAUDRATE
from simulators.server import SimConfig, Simulator

app = typer.Typer(
    help="Simulated EMU units over Modbus TCP (SunSpec), with fault injection and firmware "
    "updates. Without a sub-command, runs the simulator.",
    invoke_without_command=True,
)

ControlPort = Annotated[
    int, typer.Option("--control-port", help="Control port of the running simulator.")
]
Unit = Annotated[int, typer.Option("--unit", "-u", help="Unit number (1..N).")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


@app.callback()
def run(
    ctx: typer.Context,
    units: Annotated[int, typer.Option(min=1, help="Number of units.")] = 3,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Modbus TCP port (0: any).")] = 5020,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", "-p", help="Profile(s) to cycle through; default: all."),
    ] = None,
    one_port_per_unit: Annotated[
        bool, typer.Option(help="Each unit on its own port (unit id 1) instead of ids 1..N.")
    ] = False,
    control_port: ControlPort = DEFAULT_CONTROL_PORT,
    mqtt: Annotated[
        str | None,
        typer.Option(help="Also publish values to this broker, e.g. mqtt://127.0.0.1:1883"),
    ] = None,
    mqtt_interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between MQTT messages.")
    ] = 1.0,
    firmware_version: Annotated[str, typer.Option(help="Initial firmware version.")] = "1.0.0",
    reboot_s: Annotated[
        float, typer.Option(min=0.0, help="Seconds a unit reboots after an update.")
    ] = 3.0,
    serial: Annotated[
        str | None,
        typer.Option(
            "--serial",
            help="Also serve the units over Modbus RTU on this serial port (unit ids 1..N), "
            "e.g. /dev/ttyUSB0 or one end of a socat pty pair.",
        ),
    ] = None,
    baudrate: Annotated[
        int, typer.Option(min=1, help="Baud rate of --serial (8 data bits, no parity, 1 stop).")
    ] = DEFAULT_BAUDRATE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run N simulated units until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    try:
        for name in profile or []:
            load_profile(name)
        config = SimConfig(
            units=units,
            host=host,
            port=port,
            profiles=profile or (),
            one_port_per_unit=one_port_per_unit,
            firmware_version=firmware_version,
            reboot_s=reboot_s,
            serial_port=serial,
            baudrate=baudrate,
        )
    except (ProfileError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    mqtt_target = None
    if mqtt:
        url = urlparse(mqtt)
        if url.scheme not in ("mqtt", "tcp") or not url.hostname:
            typer.secho("error: --mqtt takes mqtt://host[:port]", err=True, fg=typer.colors.RED)
            raise typer.Exit(2)
        mqtt_target = (url.hostname, url.port or 1883)
    try:
        asyncio.run(_serve(config, control_port, mqtt_target, mqtt_interval))
    except (SimulatorError, OSError) as exc:
        raise _fail(str(exc)) from exc


async def _serve(
    config: SimConfig,
    control_port: int,
    mqtt_target: tuple[str, int] | None,
    mqtt_interval: float,
) -> None:
    from simulators.mqtt import MqttPublisher

    sim = Simulator(config)
    control = ControlServer(sim, control_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    publisher = None
    async with sim:
        await control.start()
        for ep in sim.endpoints:
            ids = [u.unit_id for u in ep.units]
            series = sorted({u.profile.series for u in ep.units})
            typer.echo(
                f"modbus tcp {ep.host}:{ep.port} unit ids {ids[0]}..{ids[-1]} ({', '.join(series)})"
            )
        if sim.serial is not None:
            line = sim.serial
            typer.echo(
                f"modbus rtu {line.port} {line.baudrate} 8N1 unit ids 1..{len(line.units)}"
            )
        typer.echo(f"control 127.0.0.1:{control.port}  (emu sim inject FAULT --unit N)")
        if mqtt_target:
            publisher = MqttPublisher(sim.units, *mqtt_target, interval_s=mqtt_interval)
            await publisher.start()
            typer.echo(f"mqtt {mqtt_target[0]}:{mqtt_target[1]} topic emu-sim/<serial>/values")
        try:
            await stop.wait()
        finally:
            if publisher is not None:
                await publisher.stop()
            await control.stop()
    typer.echo("simulator stopped")


def _send(control_port: int, payload: dict[str, Any]) -> dict[str, Any]:
    try:
        return asyncio.run(request(control_port, payload))
    except SimulatorError as exc:
        raise _fail(str(exc)) from exc


@app.command("faults")
def faults() -> None:
    """List the faults that can be injected, with their parameters."""
    for spec in FAULTS.values():
        params = ", ".join(f"{k}={v:g}" for k, v in spec.params.items())
        typer.echo(f"{spec.name:20} {spec.description}" + (f"  [{params}]" if params else ""))


@app.command("profiles")
def profiles() -> None:
    """List the shipped device profiles."""
    for name in shipped_profiles():
        p = load_profile(name)
        models = ", ".join(str(m.id) for m in p.models)
        typer.echo(f"{p.series:8} {p.model:12} models {models}  {p.description}")


def _params(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key] = float(raw)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not NAME=NUMBER", param_hint="--param") from None
    return out


@app.command("inject")
def inject(
    fault: Annotated[str, typer.Argument(help="Fault name (see `emu sim faults`).")],
    unit: Unit = 1,
    param: Annotated[list[str] | None, typer.Option("--param", help="NAME=VALUE")] = None,
    control_port: ControlPort = DEFAULT_CONTROL_PORT,
) -> None:
    """Start a fault on a unit of the running simulator."""
    if fault not in FAULTS:
        raise typer.BadParameter(f"unknown fault; known: {', '.join(FAULTS)}", param_hint="FAULT")
    answer = _send(
        control_port, {"op": "inject", "unit": unit, "fault": fault, "params": _params(param or [])}
    )
    typer.echo(f"unit {unit}: faults {', '.join(answer['unit']['faults'])}")


@app.command("clear")
def clear(
    fault: Annotated[str | None, typer.Argument(help="Fault to clear; all if omitted.")] = None,
    unit: Unit = 1,
    control_port: ControlPort = DEFAULT_CONTROL_PORT,
) -> None:
    """Clear one fault, or all faults, on a unit."""
    answer = _send(control_port, {"op": "clear", "unit": unit, "fault": fault})
    typer.echo(f"unit {unit}: faults {', '.join(answer['unit']['faults']) or 'none'}")


@app.command("update-mode")
def update_mode(
    mode: Annotated[str, typer.Argument(help="normal, refuse, fail or broken")],
    unit: Unit = 1,
    fail_at: Annotated[
        float, typer.Option(help="Fraction of the image at which `fail` fails.")
    ] = 0.5,
    control_port: ControlPort = DEFAULT_CONTROL_PORT,
) -> None:
    """Make a unit's next firmware update refuse, fail mid-way or come back broken."""
    _send(control_port, {"op": "update-mode", "unit": unit, "mode": mode, "fail_at": fail_at})
    typer.echo(f"unit {unit}: next update will be {mode}")


@app.command("status")
def status(
    control_port: ControlPort = DEFAULT_CONTROL_PORT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show every unit of the running simulator: firmware, faults, counters."""
    answer = _send(control_port, {"op": "status"})
    if as_json:
        typer.echo(json.dumps(answer["units"], indent=2))
        return
    for u in answer["units"]:
        typer.echo(
            f"{u['number']:4} port {u['port']:5} id {u['unit']:3} {u['series']:7}"
            f" fw {u['firmware']:8}"
            f" {'up  ' if u['answering'] else 'DOWN'} reads {u['reads']:6}"
            f" faults {', '.join(u['faults']) or '-'}"
        )


@app.command("image")
def image(
    series: Annotated[str, typer.Option(help="Product series, e.g. EMU-BS.")],
    version: Annotated[str, typer.Option(help="Firmware version, e.g. 1.1.0.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    payload_kib: Annotated[int, typer.Option(min=0, help="Size of the filler payload.")] = 16,
) -> None:
    """Build a firmware image a simulated unit accepts (for upgrade tests and demos)."""
    try:
        load_profile(series)
        data = FirmwareImage(series, version, bytes(range(256)) * (payload_kib * 4)).to_bytes()
    except (ProfileError, FirmwareImageError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    with contextlib.suppress(FileExistsError):
        output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    typer.echo(f"wrote {output} ({len(data)} bytes, {series} {version})")


@app.command("load")
def load(
    url: Annotated[str, typer.Option(help="Broker, mqtt://host[:port].")] = "mqtt://127.0.0.1:1883",
    sites: Annotated[int, typer.Option(min=1, help="Sites (one connection each).")] = 1000,
    units: Annotated[int, typer.Option(min=1, help="Units per site.")] = 10,
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between a site's batches.")
                        ] = 10.0,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds to publish for.")] = 60.0,
    prefix: Annotated[str, typer.Option(help="Site codes are PREFIX-00000, ...")] = "load",
    first_seq: Annotated[int, typer.Option(min=0, help="seq of each site's first batch.")] = 1,
    settle: Annotated[float, typer.Option(
        min=0, help="Seconds between every site connected (and online) and the first batch.")
    ] = 0.0,
    record: Annotated[
        Path | None, typer.Option(help="Write `agent,seq,publish time` per batch here.")
    ] = None,
) -> None:
    """Publish a fleet's telemetry at a steady rate (load tests of broker and server).

    Prints one JSON line with what was published and acknowledged.
    """
    from simulators.load import FleetLoad, LoadConfig, write_publishes

    config = LoadConfig(url=url, sites=sites, units=units, interval_s=interval,
                        duration_s=duration, prefix=prefix, first_seq=first_seq,
                        settle_s=settle)
    try:
        result = FleetLoad(config, progress=lambda phase: typer.echo(phase)).run()
    except (SimulatorError, OSError) as exc:
        raise _fail(str(exc)) from exc
    if record is not None:
        write_publishes(record, result.publishes)
    typer.echo(json.dumps(result.summary()))
