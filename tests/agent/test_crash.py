"""`kill -9` of a real agent process: what was in its spool is delivered after the restart.

The agent runs as a user runs it (`python -m emu agent -c agent.toml`), behind a `TcpProxy` that
is cut so that batches pile up in the spool. After SIGKILL the test reads the spool file itself to
learn which batches were there; the restarted agent must deliver every one of them, repeat a seq
only with the identical payload, and continue the seq instead of reusing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.batcher import EVENTS, TELEMETRY
from protocols.messages import AgentState, EventKind
from simulators.server import SimConfig, Simulator
from tests.agent.agent_harness import (
    Collector,
    SpoolRow,
    agent_config,
    broker_protocol,
    check_at_least_once,
    collecting,
    read_spool,
    received,
    sim_device,
    start_agent_process,
    stop_agent_process,
    unique_site,
    write_config,
)
from tests.support.broker import BrokerInfo
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

POLL_S = 0.5
SPOOLED_BATCHES = 6
DEADLINE = 30.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """Two units (EMU-BS, EMU-PV) on one free port."""
    async with Simulator(SimConfig(units=2, port=0, refresh_s=0.05)) as s:
        yield s


async def _spooled_telemetry(path: Path, at_least: int) -> bool:
    rows, _ = await asyncio.to_thread(read_spool, path)
    return sum(r.stream == TELEMETRY for r in rows) >= at_least


async def test_spooled_batches_survive_kill_9(
    sim: Simulator, mqtt_broker: BrokerInfo, tmp_path: Path
) -> None:
    site = unique_site("crash")
    spool = tmp_path / "spool.db"
    log = tmp_path / "agent.log"
    async with TcpProxy(mqtt_broker.host, mqtt_broker.port) as proxy:
        config = write_config(tmp_path / "agent.toml", agent_config(
            site=site, broker_url=proxy.url, protocol=broker_protocol(mqtt_broker),
            state_dir=tmp_path,
            devices=[sim_device(sim, n, poll_interval_s=POLL_S) for n in (1, 2)],
            uplink={"batch_max_age_s": POLL_S},
            broker={"connect_timeout_s": 2.0, "backoff_max_s": 1.0}))
        with collecting(mqtt_broker, site) as seen:
            first = await start_agent_process(config, log)
            try:
                await wait_for(lambda: seen.max_telemetry_seq() >= 2, DEADLINE,
                               f"the first agent's telemetry (log: {log})")
                await proxy.cut()
                await wait_for(lambda: _spooled_telemetry(spool, SPOOLED_BATCHES), DEADLINE,
                               f"{SPOOLED_BATCHES} telemetry batches in the spool")
            finally:
                if first.returncode is None:
                    first.kill()
                await first.wait()
            killed_at = datetime.now(UTC)
            rows, last_seq = await asyncio.to_thread(read_spool, spool)
            assert sum(r.stream == TELEMETRY for r in rows) >= SPOOLED_BATCHES

            await proxy.restore()
            second = await start_agent_process(config, log)
            try:
                await wait_for(lambda: _delivered(seen, rows), DEADLINE,
                               f"every batch of the killed agent's spool (log: {log})")
                await wait_for(lambda: seen.max_telemetry_seq() > last_seq[TELEMETRY], DEADLINE,
                               "new telemetry from the restarted agent")
            finally:
                code = await stop_agent_process(second)
            await wait_for(
                lambda: any(s.state is AgentState.OFFLINE for s, _ in seen.drain().statuses[-1:]),
                DEADLINE, "offline after the clean stop")

    assert code == 0, log.read_text()
    assert first.returncode == -9
    telemetry = check_at_least_once(received(seen.telemetry))
    events = check_at_least_once(received(seen.events))
    for row in rows:
        assert _payloads(seen, row.stream)[row.seq] == {row.payload}, (
            f"{row.stream} seq {row.seq} did not arrive as spooled")
    # the seq goes on where the killed agent left it, with content taken after the restart
    resumed = next(b for b, _ in seen.telemetry if b.seq == last_seq[TELEMETRY] + 1)
    assert min(p.ts for p in resumed.points) > killed_at
    assert telemetry[-1] > last_seq[TELEMETRY]
    restarted = [e for b, _ in seen.events if b.seq > last_seq[EVENTS] for e in b.events]
    assert restarted[0].kind is EventKind.AGENT_STARTED
    assert events[-1] > last_seq[EVENTS]


def _payloads(seen: Collector, stream: str) -> dict[int, set[bytes]]:
    """Every payload that arrived per seq of `stream`."""
    pairs = seen.drain().telemetry if stream == TELEMETRY else seen.drain().events
    out: dict[int, set[bytes]] = {}
    for batch, payload in pairs:
        out.setdefault(batch.seq, set()).add(payload)
    return out


def _delivered(seen: Collector, rows: list[SpoolRow]) -> bool:
    return all(row.seq in _payloads(seen, row.stream) for row in rows)
