"""The SLA engine across server restarts and across two server processes on one database.

* Restart: a scheduler-only `ServerProcess` on a ManualClock is stopped while a class A
  ticket's resolution clock runs, the clock moves past the breach while nothing runs, and a
  new process fires the breach once, stamped with the instant it fell due.
* Two processes: two `emu server` processes (scheduler role) on the same database (the real
  PostgreSQL in CI) fire every warning, breach and escalation of many tickets; each
  notification arrives exactly once at the SMTP sink and at the webhook receiver.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import col, func, select

from protocols.clock import ManualClock
from server.core.config import ServerSettings
from server.core.db import Database
from server.main import ServerProcess
from server.sla.config import SlaSettings, SmtpSettings
from server.sla.models import SlaClock, SlaContract, SlaNotification, SlaTimer
from server.tickets import service
from server.tickets.models import TicketEvent
from tests.server.tickets.conftest import MakeSite, SiteRef, pk
from tests.support.notify import SmtpSink, WebhookReceiver
from tests.support.process import read_until
from tests.support.waiting import wait_for

T0 = datetime(2026, 11, 8, 3, 0, tzinfo=UTC)


async def _chain(db: Database, site: SiteRef, hooks: WebhookReceiver,
                 **terms: object) -> None:
    chain = [{"level": lvl, "email": f"{lvl}@vendor.example", "webhook": f"{hooks.url}/{lvl}"}
             for lvl in ("engineer", "lead", "manager")]
    async with db.session() as s:
        s.add(SlaContract(org_id=site.org_id, terms={"chain": chain, **terms}))


@asynccontextmanager
async def _server(url: str, clock: ManualClock, smtp_port: int) -> AsyncIterator[ServerProcess]:
    settings = ServerSettings(
        database_url=url, roles=("scheduler",), scheduler_tick_s=0.05, migrate_on_start=False,
        sla=SlaSettings(smtp=SmtpSettings(host="127.0.0.1", port=smtp_port)))
    proc = ServerProcess(settings, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(proc.run(stop))
    try:
        await wait_for(lambda: proc.sla is not None and proc.sla.ticks >= 1, 20,
                       "the scheduler's first SLA tick")
        yield proc
    finally:
        stop.set()
        await wait_for(task, 20, "the server process to stop")


async def _events(db: Database, ticket_id: int, clock: str) -> list[TicketEvent]:
    async with db.session() as s:
        rows = (await s.exec(select(TicketEvent).where(
            TicketEvent.ticket_id == ticket_id, col(TicketEvent.kind).startswith("sla_"))
            .order_by(col(TicketEvent.id)))).all()
    return [e for e in rows if e.detail.get("clock") == clock]


async def _ticks_after(proc: ServerProcess) -> None:
    """Wait until the scheduler has run two more full ticks (so it saw the current time)."""
    seen = proc.sla.ticks
    await wait_for(lambda: proc.sla.ticks >= seen + 2, 20, "two scheduler ticks")


async def test_breach_fires_once_at_its_time_across_a_restart(
        own_db: Database, own_site: MakeSite, own_db_url: str) -> None:
    db, make_site, server_db_url = own_db, own_site, own_db_url
    site = await make_site()
    clock = ManualClock(T0)
    async with SmtpSink() as smtp, WebhookReceiver() as hooks:
        await _chain(db, site, hooks)
        async with db.session() as s:
            t = await service.open_ticket(s, site_id=site.id, source="fault", title="tripped",
                                          fault_class="A", now=T0)
        tid = pk(t)
        async with _server(server_db_url, clock, smtp.port) as proc:
            clock.advance(46 * 60)  # past the 45-minute warning of the 1-hour resolution clock
            await wait_for(lambda: _events(db, tid, "resolution"), 20, "the warning")
            await _ticks_after(proc)
        assert [e.kind for e in await _events(db, tid, "resolution")] == ["sla_warning"]

        clock.advance(13 * 60 + 59)  # 59:59 after opening, while no server runs
        async with _server(server_db_url, clock, smtp.port) as proc:
            await _ticks_after(proc)
            assert [e.kind for e in await _events(db, tid, "resolution")] == ["sla_warning"]
        clock.advance(15 * 60 + 1)  # 75 minutes after opening: the breach passed while down
        async with _server(server_db_url, clock, smtp.port) as proc:
            await wait_for(lambda: len(smtp.subjects()) >= 8, 20, "the breach email")
            await _ticks_after(proc)
        events = await _events(db, tid, "resolution")
        assert [(e.kind, e.ts) for e in events] == [
            ("sla_warning", T0 + timedelta(minutes=45)), ("sla_breach", T0 + timedelta(hours=1))]
        assert events[1].detail["detected_at"] == (T0 + timedelta(minutes=75)).isoformat()
        async with db.session() as s:
            res = (await s.exec(select(SlaClock).where(SlaClock.ticket_id == tid,
                                                       SlaClock.kind == "resolution"))).one()
        assert res.breached_at == T0 + timedelta(hours=1)
        # response and processing: warned, breached, escalated; resolution: warned, breached
        expected = Counter({"engineer": 3, "lead": 3, "manager": 2})
        assert Counter(c["level"] for c in hooks.calls) == expected
        assert Counter(str(m["To"]).split("@")[0] for m in smtp.messages) == expected


async def test_two_server_processes_notify_exactly_once(
        own_db: Database, own_site: MakeSite, own_db_url: str, tmp_path: Path) -> None:
    db, make_site, server_db_url = own_db, own_site, own_db_url
    site = await make_site()
    tickets = 4
    async with SmtpSink() as smtp, WebhookReceiver() as hooks:
        # seconds-long targets so that the real clocks of two processes run them out quickly
        await _chain(db, site, hooks, classes={"A": {"response": 1, "processing": 2,
                                                     "resolution": 3}})
        config = tmp_path / "server.toml"
        config.write_text(
            f'database_url = "{server_db_url}"\nroles = ["scheduler"]\n'
            f"scheduler_tick_s = 0.05\nmigrate_on_start = false\n"
            f'[sla.smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\n', encoding="utf-8")
        procs = []
        try:
            for _ in range(2):
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "emu", "server", "-c", str(config),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            for p in procs:
                assert p.stdout is not None
                await read_until(p.stdout, "roles scheduler", 60, "a server's banner")
            ids = []
            async with db.session() as s:
                now = datetime.now(UTC)
                for n in range(tickets):
                    t = await service.open_ticket(s, site_id=site.id, source="fault",
                                                  title=f"trip {n}", fault_class="A", now=now)
                    ids.append(pk(t))
            expected = tickets * 3 * 3  # 3 clocks, each warned, breached and escalated

            async def all_sent() -> bool:
                async with db.session() as s:
                    fired = (await s.exec(select(func.count()).select_from(SlaTimer).where(
                        col(SlaTimer.ticket_id).in_(ids), col(SlaTimer.fired_at).is_not(None))
                    )).one()
                    sent = (await s.exec(select(func.count()).select_from(SlaNotification).where(
                        col(SlaNotification.ticket_id).in_(ids),
                        col(SlaNotification.sent_at).is_not(None)))).one()
                return fired == expected and sent == 2 * expected

            await wait_for(all_sent, 60, "every timer fired and every notification sent")
        finally:
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
            outs = []
            for p in procs:
                out, _ = await wait_for(p.communicate(), 30, "a server to stop")
                outs.append(out.decode())
                assert p.returncode == 0, out.decode()
        keys = Counter((c["ticket"], c["clock"], c["event"]) for c in hooks.calls)
        assert len(keys) == expected
        assert set(keys.values()) == {1}
        mails = Counter(str(m["Subject"]) + str(m["To"]) for m in smtp.messages)
        assert len(smtp.messages) == expected, ([k for k, v in mails.items() if v > 1], outs)
        assert len(mails) <= expected
