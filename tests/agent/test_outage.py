"""A broker outage while polling goes on: everything taken meanwhile arrives afterwards, in order.

The shared broker cannot be stopped, so the agent reaches it through a `TcpProxy` that the test
cuts (connections aborted, new ones refused) and restores; the subscriber talks to the broker
directly. The outage is counted in poll cycles: at a 1 s interval, 60 cycles are the 60 s the
acceptance asks for; the 3-cycle variant is for quick local runs (`-k outage-3s`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.batcher import TELEMETRY
from agent.service import Agent
from simulators.server import SimConfig, Simulator
from tests.agent.agent_harness import (
    agent_config,
    broker_protocol,
    check_at_least_once,
    collecting,
    load_config,
    received,
    record_cycles,
    running_agent,
    sim_device,
    unique_site,
)
from tests.support.broker import BrokerInfo
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

POLL_S = 1.0
DEVICES = ("unit1", "unit2")
DEADLINE = 30.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """Two units (EMU-BS, EMU-PV) on one free port."""
    async with Simulator(SimConfig(units=2, port=0, refresh_s=0.05)) as s:
        yield s


async def _spooled_points(agent: Agent, at_least: int) -> bool:
    _, points, _ = await agent.spool.depth()
    return points >= at_least


@pytest.mark.parametrize("outage_cycles", [3, 60], ids=["outage-3s", "outage-60s"])
async def test_points_taken_during_an_outage_arrive_in_order(
    outage_cycles: int,
    sim: Simulator,
    mqtt_broker: BrokerInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = unique_site("outage")
    loop = asyncio.get_running_loop()
    async with TcpProxy(mqtt_broker.host, mqtt_broker.port) as proxy:
        settings = load_config(tmp_path / "agent.toml", agent_config(
            site=site, broker_url=proxy.url, protocol=broker_protocol(mqtt_broker),
            state_dir=tmp_path,
            devices=[sim_device(sim, n, poll_interval_s=POLL_S) for n in (1, 2)],
            uplink={"batch_max_age_s": POLL_S},
            broker={"connect_timeout_s": 2.0, "backoff_max_s": 2.0}))
        with collecting(mqtt_broker, site) as seen:
            async with running_agent(settings) as agent:
                cycles = record_cycles(monkeypatch, agent.batcher)
                await wait_for(lambda: seen.max_telemetry_seq() >= 2 and agent.uplink.stats.acked,
                               DEADLINE, "the agent publishing through the proxy")

                await proxy.cut()
                cut_at, cut_time = len(cycles), loop.time()
                await wait_for(lambda: not agent.uplink.stats.connected, DEADLINE,
                               "the agent to notice the outage")
                before = len(seen.drain().telemetry)
                await wait_for(
                    lambda: all(sum(c.device == d for c in cycles[cut_at:]) >= outage_cycles
                                for d in DEVICES),
                    outage_cycles * POLL_S + DEADLINE,
                    f"{outage_cycles} poll cycles of each unit during the outage")
                outage = cycles[cut_at:]
                outage_points = sum(c.points for c in outage)
                await wait_for(lambda: _spooled_points(agent, outage_points), DEADLINE,
                               f"the outage's {outage_points} points in the spool")
                spooled = await agent.spool.peek(0, 1_000_000)
                assert len(seen.drain().telemetry) == before, "nothing passes a cut proxy"

                await proxy.restore()
                lasted = loop.time() - cut_time
                last_seq = max(r.seq for r in spooled if r.stream == TELEMETRY)
                await wait_for(lambda: seen.max_telemetry_seq() >= last_seq, DEADLINE,
                               f"telemetry up to seq {last_seq}, the last spooled in the outage")
                await wait_for(lambda: seen.has_cycles(outage), DEADLINE,
                               "every point taken during the outage at the subscriber")
                reconnects = agent.uplink.stats.reconnects

    assert lasted >= (outage_cycles - 1) * POLL_S
    assert reconnects >= 1
    check_at_least_once(received(seen.telemetry))
    delivered = {(b.seq, payload) for b, payload in seen.telemetry}
    for row in spooled:
        if row.stream == TELEMETRY:
            assert (row.seq, row.payload) in delivered, f"spooled seq {row.seq} never arrived"
    for device in DEVICES:
        taken = [c.ts for c in outage if c.device == device]
        assert len(taken) >= outage_cycles
        assert taken == sorted(taken)
        arrived = seen.first_delivery_times(device)
        assert arrived == sorted(arrived), f"{device}: samples arrived out of order"
        missing = set(taken) - set(arrived)
        assert not missing, f"{device}: cycles lost in the outage: {sorted(missing)}"
