"""Where the agent's polling time goes: CPU per unit-cycle by thread, and the event loop's profile.

Runs `Agent(settings)` in this process against units that are already being served (e.g.
`emu sim --units 100 --profile EMU-BS --port 5020`), lets it warm up, then measures one window:
unit-cycles per second, CPU per unit-cycle for each thread (event loop, spool worker, paho
network thread, from /proc/self/task), the batcher's in-memory backlog, and, with
`--cprofile`, a cProfile of the event-loop thread (cProfile sees only that thread, and it slows
pure-Python code more than C code: read its shares, not its times).

    python -m tests.bench.agent_profile -c agent.toml --seconds 10 [--cprofile 25]

`agent.toml` is any agent configuration; `tests/bench/test_agent_polling.py` writes one per
round into its tmp_path (100 EMU-BS devices). Poll tasks are cancelled until they end before
`Agent.stop()` (see `docs/benchmarks.md`: on Python 3.11 one cancel does not always stop a busy
poller).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent.config import load_agent_settings
from agent.service import Agent

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        name = names.get(int(tid), f"thread {tid}")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def cycles(agent: Agent) -> int:
    """Unit-cycles started so far, all coordinators."""
    return sum(c.stats.cycles for c in agent.coordinators)


async def stop_agent(agent: Agent) -> None:
    """Cancel the poll tasks until they end, then stop the agent as the CLI would."""
    polls = {t for t in agent._tasks if t.get_name().startswith("poll:")}
    while polls:
        for task in polls:
            task.cancel()
        _, polls = await asyncio.wait(polls, timeout=0.1)
    await agent.stop()


async def measure(config: Path, warmup: float, seconds: float, top: int) -> None:
    """Start the agent, warm up, measure one window, print, stop."""
    agent = Agent(load_agent_settings(config))
    await agent.start()
    try:
        await asyncio.sleep(warmup)
        profile = cProfile.Profile() if top else None
        c0, cpu0, t0 = cycles(agent), thread_cpu(), time.perf_counter()
        if profile:
            profile.enable()
        await asyncio.sleep(seconds)
        if profile:
            profile.disable()
        c1, cpu1, t1 = cycles(agent), thread_cpu(), time.perf_counter()
        n = max(1, c1 - c0)
        print(f"{n / (t1 - t0):.0f} unit-cycles/s over {t1 - t0:.1f} s"
              f"{' (under cProfile)' if profile else ''}; CPU per unit-cycle by thread:")
        total = 0.0
        for name, cpu in sorted(cpu1.items(), key=lambda kv: -(kv[1] - cpu0.get(kv[0], 0))):
            used = cpu - cpu0.get(name, 0.0)
            total += used
            if used > 0.005:
                print(f"   {name:40} {used / n * 1e6:7.0f} us  ({100 * used / (t1 - t0):.0f} %"
                      " of a core)")
        print(f"   {'all threads':40} {total / n * 1e6:7.0f} us")
        print(f"batcher backlog in memory: {len(agent.batcher._points)} points;"
              f" batches written {agent.batcher.batches}, acked {agent.uplink.stats.acked}")
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(top)
    finally:
        await stop_agent(agent)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-c", "--config", type=Path, required=True, help="agent.toml")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cprofile", type=int, default=0, metavar="TOP",
                        help="profile the event loop and print the TOP functions by own time")
    args = parser.parse_args(argv)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    asyncio.run(measure(args.config, args.warmup, args.seconds, args.cprofile))


if __name__ == "__main__":
    main()
