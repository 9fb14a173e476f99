"""The ingest worker end to end: a real broker, a real database, a plain paho publisher.

Mosquitto and PostgreSQL with EMU_TEST_MQTT_URL / EMU_TEST_DATABASE_URL, else amqtt (MQTT
3.1.1, no shared subscriptions) and SQLite. Every test uses its own site codes and agent ids.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.messages import AgentState, Event, Status, TelemetryPoint
from protocols.topics import TopicKind, topic
from server.core.config import ServerSettings, load_server_settings
from server.core.db import Database
from server.ingest.worker import GC_THRESHOLD, IngestWorker, _GcTuning
from server.models import Agent, Site, Unit
from server.models import Event as EventRow
from tests.bench.server_data import T0, batch_bytes, iso, make_site, points_doc
from tests.support.broker import BrokerInfo
from tests.support.mqtt import TestClient, mqtt_client
from tests.support.waiting import wait_for

TIMEOUT = 20.0


def settings_for(broker: BrokerInfo, db: Database, **mqtt: Any) -> ServerSettings:
    """Ingest settings; a share group of its own, since others may share the test broker."""
    mqtt.setdefault("shared_group", f"emu-test-{secrets.token_hex(4)}")
    return load_server_settings(None, database_url=db.url, roles=("ingest",),
                                mqtt={"url": broker.url, **mqtt})


def agent_id() -> str:
    return f"agent-{secrets.token_hex(4)}"


async def count_rows(db: Database, site: Site) -> int:
    async with db.session() as session:
        conn = await session.connection()
        return int((await conn.execute(sa.text(
            "SELECT count(*) FROM telemetry t JOIN series s ON s.id = t.series_id "
            "JOIN unit u ON u.id = s.unit_id WHERE u.site_id = :site"
        ), {"site": site.id})).scalar_one())


class Workers:
    """Starts workers as tasks; stops every one of them at the end of the test."""

    def __init__(self) -> None:
        self.running: list[tuple[IngestWorker, asyncio.Task[None]]] = []

    async def start(self, settings: ServerSettings, db: Database, **kw: Any) -> IngestWorker:
        """A running, subscribed worker; pass `site=` to keep other tests' traffic away."""
        worker = IngestWorker(settings, db, **kw)
        task = asyncio.create_task(worker.run())
        self.running.append((worker, task))
        await wait_for(worker.ready, TIMEOUT, "the ingest worker to subscribe")
        return worker

    async def crash(self, worker: IngestWorker) -> None:
        """End a worker without draining (its unacknowledged messages stay with the broker)."""
        for w, task in self.running:
            if w is worker:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for worker, task in self.running:
            if not task.done():
                await wait_for(worker.stop(), TIMEOUT, "the ingest worker to stop")
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    pool = Workers()
    try:
        yield pool
    finally:
        await pool.close()


async def publish(client: TestClient, site: str, kind: TopicKind, payloads: Sequence[bytes],
                  ) -> None:
    for payload in payloads:
        await asyncio.to_thread(client.publish, topic(site, kind), payload)


async def test_batches_published_to_the_broker_are_stored(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers
) -> None:
    site = await make_site(db)
    worker = await workers.start(settings_for(mqtt_broker, db), db, site=site.code)
    agent = agent_id()
    payloads = [batch_bytes(agent, seq, points_doc(["u1", "u2"], 50, T0 + timedelta(seconds=seq),
                                                   with_meta=seq == 0)) for seq in range(10)]
    expected = sum(len(json.loads(p)["points"]) for p in payloads)
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY, payloads)
        await publish(client, site.code, TopicKind.TELEMETRY, payloads[:3])  # replayed
        await wait_for(lambda: worker.stats.outcomes.get("telemetry:stored") == 10
                       and worker.stats.outcomes.get("telemetry:duplicate") == 3,
                       TIMEOUT, "the batches and their replays")
    await wait_for(lambda: worker.queue_depth == 0, TIMEOUT, "the worker to go idle")
    assert await count_rows(db, site) == expected
    assert worker.stats.points == expected
    async with db.session() as session:
        units = (await session.exec(select(Unit).where(Unit.site_id == site.id))).all()
    assert sorted(u.device for u in units) == ["u1", "u2"]
    assert all(u.serial and u.firmware == "1.2.3" for u in units)
    if mqtt_broker.embedded:
        assert (worker.stats.protocol, worker.stats.shared) == ("3.1.1", False)
    elif mqtt_broker.shared_subscriptions:
        assert (worker.stats.protocol, worker.stats.shared) == ("5", True)


async def test_readings_sent_again_under_a_new_seq_are_stored_once(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers
) -> None:
    site = await make_site(db)
    worker = await workers.start(settings_for(mqtt_broker, db), db, site=site.code)
    agent = agent_id()
    doc = points_doc(["u"], 6, T0)
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY, [batch_bytes(agent, 0, doc)])
        await wait_for(lambda: worker.stats.stored == 1, TIMEOUT, "the first batch")
        # e.g. an agent whose spool was rebuilt: same readings, new seq, plus a new one
        doc2 = [*doc, *points_doc(["u"], 1, T0 + timedelta(seconds=1))]
        await publish(client, site.code, TopicKind.TELEMETRY, [batch_bytes(agent, 1, doc2)])
        await wait_for(lambda: worker.stats.stored == 2, TIMEOUT, "the second batch")
    assert await count_rows(db, site) == 7
    assert worker.stats.errors == 0


async def test_events_and_status_are_stored(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers
) -> None:
    site = await make_site(db)
    worker = await workers.start(settings_for(mqtt_broker, db), db, site=site.code)
    agent = agent_id()
    events = json.dumps({"agent": agent, "seq": 0, "events": [
        {"ts": iso(T0), "kind": "comm_lost", "device": "u9", "code": "comm", "severity": "alarm"},
        {"ts": iso(T0), "kind": "agent_started", "device": None},
    ]}).encode()
    status = Status(state=AgentState.ONLINE, agent=agent, version="1.0.0", ts=T0).to_bytes()
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.EVENTS, [events, events])
        await publish(client, site.code, TopicKind.STATUS, [status])

        async def landed() -> bool:
            async with db.session() as session:
                rows = (await session.exec(
                    select(EventRow).where(EventRow.site_id == site.id))).all()
                agents = (await session.exec(
                    select(Agent).where(Agent.agent_id == agent))).all()
            return len(rows) == 2 and len(agents) == 1 and worker.stats.duplicates == 1

        await wait_for(landed, TIMEOUT, "the events and the status to be stored")
    async with db.session() as session:
        unit = (await session.exec(select(Unit).where(Unit.site_id == site.id))).one()
        row = (await session.exec(select(Agent).where(Agent.agent_id == agent))).one()
    assert unit.device == "u9"
    assert unit.comm_lost
    assert row.online
    assert row.version == "1.0.0"
    assert row.site_id == site.id


async def test_bad_messages_are_counted_and_logged_and_the_worker_goes_on(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.ingest.worker")
    site = await make_site(db)
    worker = await workers.start(settings_for(mqtt_broker, db), db)
    agent = agent_id()
    bad_point = json.dumps({"agent": agent, "seq": 1, "points": [
        {"device": "u", "point": "p", "ts": "2026-03-01T12:00:00", "value": 1, "quality": "good"}
    ]}).encode()  # naive timestamp
    good = batch_bytes(agent, 2, points_doc(["u"], 5, T0))
    stranger = batch_bytes(agent_id(), 0, points_doc(["u"], 5, T0))
    nowhere = f"nowhere-{secrets.token_hex(3)}"
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY, [b"\xff not json", bad_point])
        await publish(client, nowhere, TopicKind.TELEMETRY, [stranger])
        await publish(client, site.code, TopicKind.TELEMETRY, [good])
        await wait_for(lambda: f"unknown site {nowhere!r}" in caplog.text, TIMEOUT,
                       "the unknown site to be reported")
        await wait_for(lambda: count_rows(db, site), TIMEOUT, "the good batch")
    # The worker listens to every site (others may publish to the broker too): counters
    # are at least ours.
    assert worker.stats.invalid >= 2
    assert worker.stats.unknown_site >= 1
    assert worker.stats.outcomes["telemetry:invalid"] >= 2
    assert await count_rows(db, site) == 5
    where = f"on emu/v1/{site.code}/telemetry"
    assert f"invalid telemetry from agent {agent} {where}: " in caplog.text
    assert "ts: timestamp 2026-03-01T12:00:00 has no time zone" in caplog.text
    assert f"invalid telemetry from agent ? {where}: " in caplog.text  # no agent id to name


async def test_a_batch_the_database_refuses_is_dropped_alone(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = await make_site(db)
    worker = await workers.start(settings_for(mqtt_broker, db), db, site=site.code)
    release = asyncio.Event()
    real_store = worker._store

    async def gated(*args: Any) -> Any:  # hold the writer until all three are queued
        await release.wait()
        return await real_store(*args)

    monkeypatch.setattr(worker, "_store", gated)
    agent = agent_id()
    too_long = "d" * 100  # valid on the wire (128), wider than unit.device (64)
    payloads = [batch_bytes(agent, 0, points_doc(["u"], 4, T0)),
                batch_bytes(agent, 1, points_doc([too_long], 4, T0)),
                batch_bytes(agent, 2, points_doc(["u"], 4, T0 + timedelta(seconds=1)))]
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY, payloads)
        await wait_for(lambda: worker.queue_depth == 3, TIMEOUT, "three batches queued")
        release.set()
        await wait_for(lambda: worker.stats.stored + worker.stats.errors == 3, TIMEOUT,
                       "the three batches to be handled")
    assert worker.stats.stored == 2
    assert worker.stats.errors == 1
    assert worker.stats.outcomes["telemetry:error"] == 1
    assert await count_rows(db, site) == 8


async def test_hooks_get_the_stored_readings_and_a_failing_hook_loses_nothing(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers
) -> None:
    site = await make_site(db)
    seen: list[tuple[str, str, int]] = []
    events: list[tuple[str, str | None]] = []

    async def on_telemetry(session: AsyncSession, s: Site, unit: Unit,
                           points: Sequence[TelemetryPoint]) -> None:
        if unit.device == "boom":
            raise RuntimeError("a bug in a rule")
        assert isinstance(session, AsyncSession)
        assert unit.id is not None
        unit.comm_lost = True  # hooks may change the unit: it is attached to the session
        seen.append((s.code, unit.device, len(points)))

    async def on_event(session: AsyncSession, s: Site, unit: Unit | None, event: Event) -> None:
        events.append((event.kind.value, None if unit is None else unit.device))

    worker = await workers.start(settings_for(mqtt_broker, db), db, site=site.code,
                                 on_telemetry=on_telemetry, on_event=on_event)
    agent = agent_id()
    ev = json.dumps({"agent": agent, "seq": 0, "events": [
        {"ts": iso(T0), "kind": "alarm_raised", "device": "ok", "code": "x"}]}).encode()
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY,
                      [batch_bytes(agent, 0, points_doc(["ok", "boom"], 4, T0))])
        await publish(client, site.code, TopicKind.EVENTS, [ev])
        await wait_for(lambda: events, TIMEOUT, "the event hook")
    # The failing call rolled back the group's hook savepoint, so the calls ran again one by
    # one: "ok" was seen twice, its effect (comm_lost) is stored once.
    assert seen == [(site.code, "ok", 4)] * 2
    assert events == [("alarm_raised", "ok")]
    assert worker.stats.hook_errors == 1
    assert await count_rows(db, site) == 8
    async with db.session() as session:
        ok = (await session.exec(select(Unit).where(Unit.site_id == site.id,
                                                    Unit.device == "ok"))).one()
    assert ok.comm_lost


async def test_an_unacknowledged_batch_is_delivered_again_after_a_crash(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = await make_site(db)
    client_id = f"emu-test-ingest-{secrets.token_hex(4)}"
    settings = settings_for(mqtt_broker, db, client_id=client_id)
    if mqtt_broker.embedded:
        pytest.skip("amqtt does not deliver unacknowledged messages again to a persistent "
                    "session; CI uses Mosquitto")
    stuck = asyncio.Event()
    first = await workers.start(settings, db, site=site.code)
    real_store = first._store

    async def never(*args: Any) -> Any:  # the database "hangs" until the process dies
        stuck.set()
        await asyncio.Event().wait()
        return await real_store(*args)

    monkeypatch.setattr(first, "_store", never)
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY,
                      [batch_bytes(agent_id(), 0, points_doc(["u"], 7, T0))])
        await wait_for(stuck, TIMEOUT, "the first worker to take the batch")
    await workers.crash(first)
    assert await count_rows(db, site) == 0
    second = await workers.start(settings, db, site=site.code)
    await wait_for(lambda: second.stats.stored == 1, TIMEOUT, "the batch to come again")
    assert await count_rows(db, site) == 7


async def test_two_workers_share_the_load_and_store_each_batch_once(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers
) -> None:
    if not mqtt_broker.shared_subscriptions:
        pytest.skip("the test broker offers no shared subscriptions (amqtt); CI uses Mosquitto")
    site = await make_site(db)
    group = f"emu-test-{secrets.token_hex(3)}"
    a = await workers.start(settings_for(mqtt_broker, db, shared_group=group), db, site=site.code)
    b = await workers.start(settings_for(mqtt_broker, db, shared_group=group), db, site=site.code)
    assert a.stats.shared
    assert b.stats.shared
    agent = agent_id()
    payloads = [batch_bytes(agent, seq, points_doc(["u"], 10, T0 + timedelta(seconds=seq)))
                for seq in range(20)]
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY, payloads)
        await wait_for(lambda: a.stats.stored + b.stats.stored == 20, TIMEOUT,
                       "both workers to store all batches")
    assert a.stats.received > 0
    assert b.stats.received > 0
    assert a.stats.duplicates + b.stats.duplicates == 0
    assert await count_rows(db, site) == 200


async def test_stop_drains_what_was_received(
    mqtt_broker: BrokerInfo, db: Database, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = await make_site(db)
    collector = gc.get_threshold()
    worker = await workers.start(settings_for(mqtt_broker, db), db, site=site.code)
    assert gc.get_threshold()[0] >= GC_THRESHOLD  # tuned while ingest runs
    release = asyncio.Event()
    real_store = worker._store

    async def slow(*args: Any) -> Any:
        await release.wait()
        return await real_store(*args)

    monkeypatch.setattr(worker, "_store", slow)
    agent = agent_id()
    with mqtt_client(mqtt_broker) as client:
        await publish(client, site.code, TopicKind.TELEMETRY,
                      [batch_bytes(agent, s, points_doc(["u"], 3, T0 + timedelta(seconds=s)))
                       for s in range(5)])
        await wait_for(lambda: worker.queue_depth == 5, TIMEOUT, "all five batches")
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)
    assert not stopping.done()
    release.set()
    await wait_for(stopping, TIMEOUT, "stop() to drain")
    assert await count_rows(db, site) == 15
    assert worker.queue_depth == 0
    await workers.close()
    assert gc.get_threshold() == collector



def test_what_survives_a_full_collection_is_frozen_until_thawed() -> None:
    """Full collections walk only what came since the last one; an hourly thaw frees cycles."""
    collector = gc.get_threshold()
    automatic = gc.isenabled()
    gc.disable()  # only this test's collections (other threads could start one meanwhile)
    _GcTuning.enter()
    try:
        assert gc.get_threshold()[0] >= GC_THRESHOLD
        _GcTuning.tend()
        assert gc.get_freeze_count() == 0, "nothing is frozen before a full collection"
        gc.collect()
        assert _GcTuning.freeze_due
        _GcTuning.tend()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not _GcTuning.freeze_due
        _GcTuning.tend()  # no full collection since: nothing more is frozen
        assert gc.get_freeze_count() <= frozen  # (frozen objects may still die by refcount)
        _GcTuning.thaw_at = 0.0  # the thaw is due
        _GcTuning.tend()
        assert gc.get_freeze_count() == 0
        assert _GcTuning.thaw_at > 0.0
        gc.collect()
        _GcTuning.tend()
        assert gc.get_freeze_count() > 0
    finally:
        _GcTuning.leave()
        if automatic:
            gc.enable()
    assert gc.get_freeze_count() == 0, "a process without ingest keeps Python's collector"
    assert gc.get_threshold() == collector
    assert _GcTuning._collected not in gc.callbacks
