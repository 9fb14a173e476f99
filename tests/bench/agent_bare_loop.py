"""Baseline for the agent polling benchmark: a bare pymodbus loop doing the agent's reads.

One `AsyncModbusTcpClient` per unit (as the agent has one `ModbusLink` per unit, with the same
timeout and retries), each doing the agent's read plan for the profile on the agent's fixed
schedule (start + k * interval, overrun slots skipped), and nothing else: no decoding, no
batching, no spool, no uplink. Runs in its own process, like `emu agent`:

    python -m tests.bench.agent_bare_loop --port 5020 --units 100 --interval 1.0 --stats FILE

Every `--stats-interval` seconds it replaces FILE with its counters (`ts`, `cycles`, `reads`,
`errors`, `skipped_slots`, `connected`), as the agent writes its health file. Runs until
SIGTERM or SIGINT, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from protocols.planner import ReadRequest, plan_reads
from protocols.profiles import load_profile
from protocols.registers import Table

HOST = "127.0.0.1"
TIMEOUT_S = 1.0
RETRIES = 1
"""The agent's defaults for a device (`DeviceSettings.timeout_s`, `.retries`)."""


@dataclass
class Counters:
    """What all units did so far."""

    ts: float = 0.0
    cycles: int = 0
    reads: int = 0
    errors: int = 0
    skipped_slots: int = 0
    connected: int = 0


def agent_plan(profile_name: str) -> list[ReadRequest]:
    """The reads the agent makes per cycle for this profile (its own planner and max_gap)."""
    profile = load_profile(profile_name)
    return plan_reads(profile.poll_points, max_gap=profile.max_gap)


async def poll_unit(
    client: AsyncModbusTcpClient, unit_id: int, plan: Sequence[ReadRequest], interval: float,
    counters: Counters, stop: asyncio.Event,
) -> None:
    """The plan's reads for one unit, every `interval` on a fixed schedule, until `stop`."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        for req in plan:
            read = (client.read_input_registers if req.table is Table.INPUT
                    else client.read_holding_registers)
            counters.reads += 1
            try:
                rr = await read(req.address, count=req.count, device_id=unit_id)
            except ModbusException:
                counters.errors += 1
                continue
            if rr.isError() or len(rr.registers) != req.count:
                counters.errors += 1
        counters.cycles += 1
        next_at += interval
        now = loop.time()
        if now > next_at:
            missed = math.ceil((now - next_at) / interval)
            counters.skipped_slots += missed
            next_at += missed * interval
        await asyncio.sleep(next_at - now)


def write_stats(path: Path, counters: Counters) -> None:
    """Atomically replace the stats file."""
    counters.ts = time.time()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(counters)), encoding="utf-8")
    os.replace(tmp, path)


async def run(args: argparse.Namespace) -> None:
    """Connect every unit, poll until SIGTERM/SIGINT, writing the counters as we go."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    plan = agent_plan(args.profile)
    counters = Counters()
    clients = [
        AsyncModbusTcpClient(HOST, port=args.port, timeout=TIMEOUT_S, retries=RETRIES,
                             reconnect_delay=0)
        for _ in range(args.units)
    ]
    try:
        connected = await asyncio.gather(*(c.connect() for c in clients))
        counters.connected = sum(bool(ok) for ok in connected)
        tasks = [
            asyncio.create_task(poll_unit(c, n, plan, args.interval, counters, stop))
            for n, c in enumerate(clients, 1)
        ]
        while not stop.is_set():
            await asyncio.to_thread(write_stats, args.stats, counters)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.stats_interval)
        # Each task sees `stop` at the end of its cycle; no cancellation needed.
        await asyncio.gather(*tasks)
        await asyncio.to_thread(write_stats, args.stats, counters)
    finally:
        for c in clients:
            c.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and poll."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="Modbus TCP port on 127.0.0.1")
    parser.add_argument("--units", type=int, default=100, help="unit ids 1..N on that port")
    parser.add_argument("--profile", default="EMU-BS", help="profile whose plan is read")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between cycles")
    parser.add_argument("--stats", type=Path, required=True, help="counters file (JSON)")
    parser.add_argument("--stats-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
