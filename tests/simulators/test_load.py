"""`emu sim load` (smoke): every site publishes valid agent batches, on schedule, acknowledged.

The full fleet (1,000 sites into the server) is the benchmark tests/bench/test_fleet_load.py;
this runs a handful of sites for a second against the test broker.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import defaultdict
from pathlib import Path

from protocols.messages import AgentState, Status, TelemetryBatch
from protocols.topics import TopicKind, parse_topic, topic
from simulators.load import FleetLoad, LoadConfig, site_code, write_publishes
from tests.support.broker import BrokerInfo
from tests.support.mqtt import TestClient, mqtt_client

SITES, UNITS = 6, 2


async def test_fleet_load_publishes_each_site_on_schedule(
    mqtt_broker: BrokerInfo, tmp_path: Path
) -> None:
    prefix = f"smoke{uuid.uuid4().hex[:6]}"
    config = LoadConfig(url=mqtt_broker.url, sites=SITES, units=UNITS, interval_s=0.5,
                        duration_s=1.0, prefix=prefix)
    with mqtt_client(mqtt_broker) as sub:
        sub.subscribe("emu/v1/+/telemetry")
        result = await asyncio.to_thread(FleetLoad(config).run)
        got: dict[str, list[int]] = defaultdict(list)
        while sum(map(len, got.values())) < result.published:
            msg = sub.receive(what=f"batch {sum(map(len, got.values())) + 1}")
            site, kind = parse_topic(msg.topic)
            if kind is not TopicKind.TELEMETRY or not site.startswith(prefix):
                continue  # another test's traffic on a shared broker
            batch = TelemetryBatch.from_bytes(bytes(msg.payload))
            assert batch.agent == site
            assert len(batch.points) == result.points_per_batch
            assert {p.device for p in batch.points} == {"emu-bs-1", "emu-pv-2"}
            got[site].append(batch.seq)
    assert result.published == SITES * 2  # two intervals of every site
    assert result.acked == result.published
    assert result.disconnects == SITES  # the clean ones at the end
    assert sorted(got) == [site_code(prefix, n) for n in range(SITES)]
    assert all(sorted(seqs) == [1, 2] for seqs in got.values())
    write_publishes(tmp_path / "pubs.csv", result.publishes)
    assert len((tmp_path / "pubs.csv").read_text().splitlines()) == result.published


async def test_settle_holds_the_first_batch_until_the_fleet_is_connected(
    mqtt_broker: BrokerInfo,
) -> None:
    """`--settle`: the connect storm (every site's `online`) stays out of a measured window."""
    prefix = f"settle{uuid.uuid4().hex[:6]}"
    config = LoadConfig(url=mqtt_broker.url, sites=2, units=1, interval_s=0.5, duration_s=0.5,
                        prefix=prefix, settle_s=0.3)
    load = FleetLoad(config)
    result = await asyncio.to_thread(load.run)
    assert result.acked == result.published == 2
    assert result.statuses == 4  # online at connect, offline at the end, per site
    first = min(wall for _, _, wall in result.publishes)
    assert first >= result.start
    assert load.connected_at is not None
    assert first - load.connected_at >= config.settle_s


def _statuses(sub: TestClient, prefix: str, want: int) -> dict[str, list[Status]]:
    """Status messages of this test's sites, until `want` of them arrived."""
    got: dict[str, list[Status]] = defaultdict(list)
    while sum(map(len, got.values())) < want:
        msg = sub.receive(what=f"status {sum(map(len, got.values())) + 1} of {want}")
        site, kind = parse_topic(msg.topic)
        if kind is TopicKind.STATUS and site.startswith(prefix):
            got[site].append(Status.from_bytes(bytes(msg.payload)))
    return got


async def test_each_site_says_online_at_connect_and_offline_at_the_end(
    mqtt_broker: BrokerInfo
) -> None:
    prefix = f"smoke{uuid.uuid4().hex[:6]}"
    config = LoadConfig(url=mqtt_broker.url, sites=3, units=1, interval_s=0.5, duration_s=0.5,
                        prefix=prefix)
    with mqtt_client(mqtt_broker) as sub:
        sub.subscribe("emu/v1/+/status")
        result = await asyncio.to_thread(FleetLoad(config).run)
        got = _statuses(sub, prefix, 6)
    assert result.statuses == 6
    assert sorted(got) == [site_code(prefix, n) for n in range(3)]
    for site, statuses in got.items():
        assert [s.state for s in statuses] == [AgentState.ONLINE, AgentState.OFFLINE]
        assert {s.agent for s in statuses} == {site}  # the agent id its batches carry
    with mqtt_client(mqtt_broker) as late:  # what a server starting now would be told
        late.subscribe(topic(site_code(prefix, 0), TopicKind.STATUS))
        retained = late.receive(what="the retained status")
        assert retained.retain
        assert Status.from_bytes(bytes(retained.payload)).state is AgentState.OFFLINE


async def test_a_site_that_drops_off_leaves_its_will(mqtt_broker: BrokerInfo) -> None:
    prefix = f"smoke{uuid.uuid4().hex[:6]}"
    load = FleetLoad(LoadConfig(url=mqtt_broker.url, sites=1, units=1, prefix=prefix))
    with mqtt_client(mqtt_broker) as sub:
        sub.subscribe("emu/v1/+/status")
        await asyncio.to_thread(load.connect)
        assert [s.state for s in _statuses(sub, prefix, 1)[site_code(prefix, 0)]] == [
            AgentState.ONLINE]
        sock = load.sites[0].client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the gateway vanishes: no DISCONNECT is sent
        will = _statuses(sub, prefix, 1)[site_code(prefix, 0)]
        assert [s.state for s in will] == [AgentState.OFFLINE]
    load.close()
