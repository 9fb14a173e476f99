"""Benchmark of the SLA engine: firing due timers and writing their notifications.

Subject: `SlaEngine.fire_due` over every due timer of TICKETS class A tickets (3 clocks x
warning, breach, escalation = 9 timers each, each writing a timeline entry and one email
notification), then `send_due` with a sender that only counts (so SMTP and HTTP are not
measured). Baseline: the least any exactly-once claim must do for the same rows, as bare SQL
in batches of 100: a conditional `UPDATE sla_timer SET fired_at ... WHERE fired_at IS NULL`,
one timeline insert and one notification insert per timer, then one `UPDATE` per notification
to mark it sent. Rounds alternate, each on freshly opened tickets, in one database (the test
database: SQLite, or PostgreSQL with EMU_TEST_DATABASE_URL).

Run: `pytest -m bench tests/bench/test_sla_engine.py -s`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from server.core.db import Database, migrate_sync
from server.models import Organisation, Site
from server.sla.engine import SlaEngine
from server.sla.models import SlaContract
from server.tickets import service
from tests.support.database import fresh_database

pytestmark = pytest.mark.bench

TICKETS = 40
ROUNDS = 3
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
FAR = T0 + timedelta(days=1)


class CountingSender:
    """Accepts every message."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, channel: str, recipient: str, subject: str,
                   payload: dict[str, Any]) -> None:
        """Count it."""
        self.sent += 1

    async def aclose(self) -> None:
        """Nothing to close."""


@pytest.fixture
async def bench_db(database_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh database for the benchmark."""
    with fresh_database(database_url, tmp_path) as url:
        migrate_sync(url)
        db = Database(url)
        yield db
        await db.close()


async def _tickets(db: Database, tag: str) -> list[int]:
    async with db.session() as s:
        org = Organisation(name=f"bench-{tag}")
        s.add(org)
        await s.flush()
        site = Site(code=f"bench-{tag}", name=tag, org_id=service.require_id(org.id))
        s.add(site)
        await s.flush()
        s.add(SlaContract(org_id=service.require_id(org.id), terms={"chain": [
            {"level": lvl, "email": f"{lvl}@vendor.example"}
            for lvl in ("engineer", "lead", "manager")]}))
        ids = []
        for n in range(TICKETS):
            t = await service.open_ticket(s, site_id=service.require_id(site.id),
                                          source="fault", title=f"t{n}", fault_class="A", now=T0)
            ids.append(service.require_id(t.id))
    return ids


async def _subject(db: Database, tag: str) -> float:
    await _tickets(db, tag)
    sender = CountingSender()
    engine = SlaEngine(db, sender=sender)
    start = time.perf_counter()
    fired = await engine.fire_due(FAR)
    sent = failed = 0
    while True:  # the sender takes `batch` (100) rows per call, as each scheduler tick does
        n, bad = await engine.send_due(FAR)
        sent, failed = sent + n, failed + bad
        if n + bad == 0:
            break
    elapsed = time.perf_counter() - start
    assert fired == sent == sender.sent == 9 * TICKETS
    assert failed == 0
    return elapsed


async def _baseline(db: Database, tag: str) -> float:
    ids = await _tickets(db, tag)
    ts = FAR.replace(tzinfo=None) if db.is_sqlite else FAR
    start = time.perf_counter()
    async with db.engine.connect() as conn:
        query = sa.text(
            "SELECT id, ticket_id FROM sla_timer WHERE fired_at IS NULL AND due_at <= :far "
            "AND ticket_id IN :ids ORDER BY due_at").bindparams(
                sa.bindparam("ids", expanding=True))
        timers = (await conn.execute(query, {"far": ts, "ids": ids})).all()
    notes: list[int] = []
    for i in range(0, len(timers), 100):
        async with db.engine.begin() as conn:
            for timer_id, ticket_id in timers[i:i + 100]:
                claimed = await conn.execute(sa.text(
                    "UPDATE sla_timer SET fired_at = :now WHERE id = :id AND fired_at IS NULL"),
                    {"now": ts, "id": timer_id})
                assert claimed.rowcount == 1
                await conn.execute(sa.text(
                    "INSERT INTO ticket_event (ticket_id, ts, kind, text, detail) "
                    "VALUES (:t, :ts, 'sla_breach', '', '{}')"),
                    {"t": ticket_id, "ts": ts})
                row = await conn.execute(sa.text(
                    "INSERT INTO sla_notification (ticket_id, timer_id, channel, recipient, level,"
                    " subject, payload, created_at, next_try_at, attempts) VALUES (:t, :id, "
                    "'email', 'x@y', 'lead', 's', '{}', :ts, :ts, 0) RETURNING id"),
                    {"t": ticket_id, "id": timer_id,
                     "ts": ts})
                notes.append(row.scalar_one())
    for i in range(0, len(notes), 100):
        async with db.engine.begin() as conn:
            for note in notes[i:i + 100]:
                await conn.execute(sa.text(
                    "UPDATE sla_notification SET sent_at = :ts, attempts = 1 WHERE id = :id"),
                    {"ts": ts, "id": note})
    elapsed = time.perf_counter() - start
    assert len(notes) == 9 * TICKETS
    return elapsed


async def test_sla_engine_against_bare_claims(bench_db: Database) -> None:
    subject: list[float] = []
    baseline: list[float] = []
    for r in range(ROUNDS):
        subject.append(await _subject(bench_db, f"s{r}"))
        baseline.append(await _baseline(bench_db, f"b{r}"))
    timers = 9 * TICKETS
    s, b = statistics.median(subject), statistics.median(baseline)
    print(f"\nSLA engine ({'SQLite' if bench_db.is_sqlite else 'PostgreSQL'}), {timers} timers "
          f"+ {timers} notifications per round, {ROUNDS} rounds")
    print(f"  engine:   {s:.3f} s  ({timers / s:.0f} timers/s fired and notified)")
    print(f"  baseline: {b:.3f} s  ({timers / b:.0f} timers/s, bare SQL claims)")
    print(f"  ratio engine/baseline time: {s / b:.2f}")
    assert s > 0
    assert b > 0
