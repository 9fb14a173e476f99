"""Benchmark: 125-register reads from `emu sim` against a bare pymodbus server with the same data.

Both servers run as their own processes on 127.0.0.1 (so that the client here and the server's
event loop do not share a core): the subject is `python -m emu sim`, the baseline is
`python -m tests.bench.raw_server`, which serves the simulator's own `SimDevice`s without their
`action` hook. One client connection reads 125 holding registers from 40004 back to back, after
a warm-up, for a fixed time; rounds alternate subject and baseline, and the medians are printed
as a ratio, because the machines are shared and noisy. Besides reads per second (which includes
the client's own cost), each round records the server process's CPU time per read.

Run with the other benchmarks: `pytest -m bench tests/bench -s`. Asserts sanity only, not speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pymodbus
import pytest
from pymodbus.client import AsyncModbusTcpClient

from tests.support.net import LOOPBACK, free_tcp_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.bench

PROFILE = "EMU-BS"
ADDRESS = 40004
"""First register after the SunS marker and model 1's header: a contiguous block of 350+."""
COUNT = 125
"""The most registers one Modbus read may ask for."""
ROUNDS = 3
ROUND_S = 3.0
WARMUP_S = 0.5
FLEET_UNITS = 200
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Round:
    """One timed run of back-to-back reads against one server."""

    reads: int
    seconds: float
    server_cpu_s: float | None

    @property
    def per_second(self) -> float:
        """Reads per wall-clock second."""
        return self.reads / self.seconds

    @property
    def cpu_us_per_read(self) -> float | None:
        """Server CPU time (user + system) per read, in microseconds, where /proc tells it."""
        return None if self.server_cpu_s is None else self.server_cpu_s / self.reads * 1e6


@dataclass(frozen=True)
class Server:
    """A server process under measurement and where it listens."""

    name: str
    proc: asyncio.subprocess.Process
    port: int


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used so far by process `pid` (Linux /proc; None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


@contextlib.asynccontextmanager
async def server_process(
    name: str, args: Sequence[str], port: int, log: Path
) -> AsyncIterator[Server]:
    """Start `python -m ARGS` listening on `port`, wait until it accepts, SIGTERM it after."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args, stdout=out, stderr=asyncio.subprocess.STDOUT
        )

    async def listening() -> bool:
        if proc.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"{name} exited with {proc.returncode}: {output}")
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    try:
        await wait_for(listening, START_TIMEOUT_S, f"{name} to listen on port {port}")
        yield Server(name, proc, port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await wait_for(proc.wait(), STOP_TIMEOUT_S, f"{name} to stop")
        except AssertionError:
            proc.kill()
            await proc.wait()
            raise
    if code != 0:
        output = await asyncio.to_thread(log.read_text)
        raise AssertionError(f"{name} exited with {code}: {output}")


async def timed_reads(server: Server, unit_ids: Sequence[int]) -> Round:
    """Warm up, then read `COUNT` registers back to back for `ROUND_S` on one connection."""
    client = AsyncModbusTcpClient(LOOPBACK, port=server.port, timeout=2, retries=0)
    assert await client.connect(), f"cannot connect to {server.name}"
    ids = itertools.cycle(unit_ids)
    errors = 0
    try:
        warm_until = time.perf_counter() + WARMUP_S
        while time.perf_counter() < warm_until:
            await client.read_holding_registers(ADDRESS, count=COUNT, device_id=next(ids))
        cpu_before = process_cpu_s(server.proc.pid)
        reads = 0
        start = time.perf_counter()
        end = start + ROUND_S
        while (now := time.perf_counter()) < end:
            rr = await client.read_holding_registers(ADDRESS, count=COUNT, device_id=next(ids))
            if rr.isError() or len(rr.registers) != COUNT:
                errors += 1
            reads += 1
        cpu = _cpu_delta(cpu_before, process_cpu_s(server.proc.pid))
    finally:
        client.close()
    assert errors == 0, f"{server.name}: {errors} of {reads} reads failed"
    return Round(reads, now - start, cpu)


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _median_cpu(rounds: Sequence[Round]) -> float | None:
    values = [r.cpu_us_per_read for r in rounds]
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) else None


def report(title: str, label: str, sim: Sequence[Round], raw: Sequence[Round]) -> float:
    """Print the rounds and the medians as a ratio against the baseline; return the ratio."""
    print(f"\n== {title} ==")
    print(
        f"   {ROUNDS} rounds x {ROUND_S:g} s each, alternating sim/raw, after {WARMUP_S:g} s"
        f" warm-up; python {sys.version.split()[0]}, pymodbus {pymodbus.__version__},"
        f" {os.cpu_count()} cores"
    )
    print("   round  sim reads/s  raw reads/s  sim CPU us/read  raw CPU us/read")
    for n, (s, r) in enumerate(zip(sim, raw, strict=True), 1):
        print(
            f"   {n:5}  {s.per_second:11.0f}  {r.per_second:11.0f}"
            f"  {_fmt(s.cpu_us_per_read):>15}  {_fmt(r.cpu_us_per_read):>15}"
        )
    sim_rate = statistics.median(r.per_second for r in sim)
    raw_rate = statistics.median(r.per_second for r in raw)
    ratio = sim_rate / raw_rate
    print(f"sim reads/s ({label}): {sim_rate:.0f}  raw pymodbus: {raw_rate:.0f}  ratio {ratio:.2f}")
    sim_cpu, raw_cpu = _median_cpu(sim), _median_cpu(raw)
    cpu_ratio = None if sim_cpu is None or raw_cpu is None else sim_cpu / raw_cpu
    print(
        f"server CPU us/read ({label}): {_fmt(sim_cpu)}  raw pymodbus: {_fmt(raw_cpu)}"
        f"  ratio {_fmt(cpu_ratio, '.2f')}"
    )
    return ratio


async def compare(tmp_path: Path, units: int, title: str, label: str) -> float:
    """Run `emu sim` and the raw server with `units` units; alternate timed rounds; report."""
    sim_port, control_port, raw_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    sim_args = [
        "emu",
        "sim",
        "--units",
        str(units),
        "--profile",
        PROFILE,
        "--port",
        str(sim_port),
        "--control-port",
        str(control_port),
    ]
    raw_args = [
        "tests.bench.raw_server",
        "--units",
        str(units),
        "--profile",
        PROFILE,
        "--port",
        str(raw_port),
    ]
    unit_ids = range(1, units + 1)
    sim_rounds: list[Round] = []
    raw_rounds: list[Round] = []
    async with (
        server_process("emu sim", sim_args, sim_port, tmp_path / "sim.log") as sim,
        server_process("raw pymodbus", raw_args, raw_port, tmp_path / "raw.log") as raw,
    ):
        for _ in range(ROUNDS):
            sim_rounds.append(await timed_reads(sim, unit_ids))
            raw_rounds.append(await timed_reads(raw, unit_ids))
    return report(title, label, sim_rounds, raw_rounds)


async def test_sim_125_register_reads_one_connection(tmp_path: Path) -> None:
    """Simulator unit 1 (EMU-BS) against a bare pymodbus server with the same registers."""
    ratio = await compare(
        tmp_path, 1, "simulator: 125-register reads, 1 unit, 1 connection", "125 regs, 1 conn"
    )
    assert ratio > 0


async def test_sim_fleet_reads_round_robin(tmp_path: Path) -> None:
    """200 EMU-BS units on one port, unit ids read round-robin, against the same raw fleet."""
    ratio = await compare(
        tmp_path,
        FLEET_UNITS,
        f"simulator fleet: 125-register reads, {FLEET_UNITS} units round-robin, 1 connection",
        f"125 regs, {FLEET_UNITS} units, 1 conn",
    )
    assert ratio > 0
