"""`emu sim load` (smoke): every site publishes valid agent batches, on schedule, acknowledged.

The full fleet (1,000 sites into the server) is the benchmark tests/bench/test_fleet_load.py;
this runs a handful of sites for a second against the test broker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path

from protocols.messages import TelemetryBatch
from protocols.topics import parse_topic
from simulators.load import FleetLoad, LoadConfig, site_code, write_publishes
from tests.support.broker import BrokerInfo
from tests.support.mqtt import mqtt_client

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
            site, _ = parse_topic(msg.topic)
            if not site.startswith(prefix):
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
