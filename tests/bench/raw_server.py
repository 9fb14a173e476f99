"""Baseline for the simulator benchmarks: a bare pymodbus server holding the simulator's data.

Each device is the very `SimDevice` the simulator would serve for that unit (same profile,
serial, firmware, register layout and values), minus its `action` hook, so a benchmark against
this process measures what the simulator's hook costs on top of pymodbus itself. Runs in its
own process, like `emu sim`, so that it gets a core of its own:

    python -m tests.bench.raw_server --port 15020 [--units 200] [--profile EMU-BS]

Serves until SIGTERM or SIGINT, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from collections.abc import Sequence

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimDevice

from protocols.profiles import load_profile
from simulators.unit import SimUnit

HOST = "127.0.0.1"


def raw_devices(profile_name: str, units: int) -> list[SimDevice]:
    """Unit ids 1..`units` as `emu sim --profile NAME` builds them, without the action hook."""
    profile = load_profile(profile_name)
    devices = []
    for n in range(1, units + 1):
        # The serial mirrors simulators.server.Simulator, so the static registers match too.
        unit = SimUnit(profile, n, serial=f"{profile.model}-{n:06d}")
        devices.append(dataclasses.replace(unit.simdevice(), action=None))
    return devices


async def serve(port: int, devices: list[SimDevice]) -> None:
    """Serve `devices` on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = ModbusTcpServer(devices, address=(HOST, port), ignore_missing_devices=True)
    await server.serve_forever(background=True)
    try:
        await stop.wait()
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--units", type=int, default=1, help="devices with ids 1..N")
    parser.add_argument("--profile", default="EMU-BS", help="device profile of every unit")
    args = parser.parse_args(argv)
    if not 1 <= args.units <= 247:
        parser.error("--units must be within 1..247 (one port)")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    asyncio.run(serve(args.port, raw_devices(args.profile, args.units)))


if __name__ == "__main__":
    main()
