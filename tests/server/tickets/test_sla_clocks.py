"""SLA clocks per class under their calendars: due times, pause/resume, warning, breach and
escalation, each exactly once, with every notification counted at a real SMTP sink and a
webhook receiver. Time is passed explicitly (the engine's injectable clock)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import select

from server.core.db import Database
from server.sla.calendar import calendar_from_spec
from server.sla.config import SlaSettings, SmtpSettings
from server.sla.engine import SlaEngine
from server.sla.models import SlaClock, SlaContract, SlaNotification
from server.tickets import service
from server.tickets.models import TicketEvent
from tests.server.tickets.conftest import MakeSite, SiteRef, pk
from tests.support.notify import SmtpSink, WebhookReceiver

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def local(tz: str, *args: int) -> datetime:
    """A site-local wall time as aware UTC."""
    return datetime(*args, tzinfo=ZoneInfo(tz)).astimezone(UTC)  # type: ignore[arg-type,misc]


@dataclass(frozen=True)
class Case:
    """A ticket opened at `opened` (site-local) and its expected due times (site-local)."""

    name: str
    tz: str
    country: str | None
    source: str
    fault_class: str | None
    opened: tuple[int, ...]
    due: dict[str, tuple[int, ...]]
    warning: dict[str, tuple[int, ...]]


CASES = [
    Case("A at 03:00 on a Sunday: 7x24", BERLIN, "DE", "fault", "A", (2026, 11, 8, 3, 0),
         due={"response": (2026, 11, 8, 3, 5), "processing": (2026, 11, 8, 3, 15),
              "resolution": (2026, 11, 8, 4, 0)},
         warning={"response": (2026, 11, 8, 3, 3, 45), "processing": (2026, 11, 8, 3, 11, 15),
                  "resolution": (2026, 11, 8, 3, 45)}),
    Case("B on a weekday evening: 7x24", NEW_YORK, "US", "phone", "B", (2026, 11, 4, 23, 50),
         due={"response": (2026, 11, 4, 23, 55), "processing": (2026, 11, 5, 0, 20),
              "resolution": (2026, 11, 5, 1, 50)},
         warning={"response": (2026, 11, 4, 23, 53, 45),
                  "processing": (2026, 11, 5, 0, 12, 30),
                  "resolution": (2026, 11, 5, 1, 20)}),
    # Friday 22 May 2026, 17:55 in Berlin; Monday 25 May is Whit Monday (a German public
    # holiday): 5 minutes on Friday, then nothing until Tuesday 08:00.
    Case("C on Friday 17:55 before a public holiday", BERLIN, "DE", "fault", "C",
         (2026, 5, 22, 17, 55),
         due={"response": (2026, 5, 22, 18, 0), "processing": (2026, 5, 26, 8, 40)},
         warning={"response": (2026, 5, 22, 17, 58, 45),
                  "processing": (2026, 5, 26, 8, 28, 45)}),
    # Wednesday 25 November 2026, 16:30 in New York; Thursday 26th is Thanksgiving.
    Case("D before Thanksgiving", NEW_YORK, "US", "portal", "D", (2026, 11, 25, 16, 30),
         due={"response": (2026, 11, 25, 16, 35), "processing": (2026, 11, 27, 8, 30)},
         warning={"response": (2026, 11, 25, 16, 33, 45),
                  "processing": (2026, 11, 25, 18, 0)}),
    Case("upgrade request: 30 days", BERLIN, None, "upgrade_request", None,
         (2026, 11, 2, 10, 0), due={"delivery": (2026, 12, 2, 10, 0)},
         warning={"delivery": (2026, 11, 24, 22, 0)}),
]


async def _contract(db: Database, site: SiteRef, hooks: WebhookReceiver) -> None:
    chain = [{"level": lvl, "name": lvl, "email": f"{lvl}@vendor.example",
              "webhook": f"{hooks.url}/{lvl}"} for lvl in ("engineer", "lead", "manager")]
    async with db.session() as s:
        s.add(SlaContract(org_id=site.org_id, terms={"chain": chain}))


async def _clocks(db: Database, ticket_id: int) -> dict[str, SlaClock]:
    async with db.session() as s:
        rows = (await s.exec(select(SlaClock).where(SlaClock.ticket_id == ticket_id))).all()
    return {c.kind: c for c in rows}


async def _sla_events(db: Database, ticket_id: int) -> Counter[tuple[str, str]]:
    async with db.session() as s:
        rows = (await s.exec(select(TicketEvent).where(
            TicketEvent.ticket_id == ticket_id, TicketEvent.kind.startswith("sla_")))).all()
    return Counter((e.detail["clock"], e.kind) for e in rows)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_due_times_pause_warn_breach_escalate_once(
        own_db: Database, own_site: MakeSite, case: Case) -> None:
    # A database of its own: it counts the timers a tick fires, and the shared one holds
    # other tests' timers that fall due within this case's weeks.
    db, make_site = own_db, own_site
    policy = {"sla": {"hours": {"country": case.country}}} if case.country else {}
    site = await make_site(timezone=case.tz, policy=policy)
    async with SmtpSink() as smtp, WebhookReceiver() as hooks:
        await _contract(db, site, hooks)
        settings = SlaSettings(smtp=SmtpSettings(host="127.0.0.1", port=smtp.port))
        engine = SlaEngine(db, settings)
        try:
            await _run_case(db, engine, site, case, smtp, hooks)
        finally:
            await engine.close()


async def _run_case(db: Database, engine: SlaEngine, site: SiteRef, case: Case,
                    smtp: SmtpSink, hooks: WebhookReceiver) -> None:
    opened = local(case.tz, *case.opened)
    async with db.session() as s:
        t = await service.open_ticket(s, site_id=site.id, source=case.source, title=case.name,
                                      fault_class=case.fault_class, now=opened)
    tid = pk(t)
    clocks = await _clocks(db, tid)
    assert {k: c.due_at for k, c in clocks.items()} == {
        k: local(case.tz, *v) for k, v in case.due.items()}

    # Step through every timer due before the pause: none fires a second early, each
    # fires at its instant, once.
    last = max(clocks.values(), key=lambda c: c.target_s)
    pause_at = local(case.tz, *case.warning[last.kind]) + timedelta(seconds=30)
    schedule = []
    for kind, clock in clocks.items():
        cal = calendar_from_spec(clock.calendar)
        schedule += [(local(case.tz, *case.warning[kind]), kind, "sla_warning"),
                     (local(case.tz, *case.due[kind]), kind, "sla_breach"),
                     (cal.add(opened, 1.5 * clock.target_s), kind, "sla_escalation")]
    for when, kind, event in sorted(schedule):
        if when >= pause_at:
            continue
        await engine.tick(when - timedelta(seconds=1))
        assert (await _sla_events(db, tid))[(kind, event)] == 0, (kind, event)
        await engine.tick(when)
        await engine.tick(when)
        assert (await _sla_events(db, tid))[(kind, event)] == 1, (kind, event)
    clocks = await _clocks(db, tid)
    assert {k: c.warned_at for k, c in clocks.items()} == {
        k: local(case.tz, *v) for k, v in case.warning.items()}

    # Pause for 3 hours: the last clock's breach moves by 3 hours of its calendar.
    resume_at = pause_at + timedelta(hours=3)
    cal = calendar_from_spec(last.calendar)
    left = last.target_s - cal.between(opened, pause_at)
    async with db.session() as s:
        await service.pause_clocks(s, tid, "consent", now=pause_at)
    assert (await engine.tick(resume_at)).fired == 0  # paused: nothing is due
    async with db.session() as s:
        await service.resume_clocks(s, tid, "consent", now=resume_at)
    expected_breach = cal.add(resume_at, left)
    assert (await _clocks(db, tid))[last.kind].due_at == expected_breach
    assert (await engine.tick(expected_breach - timedelta(seconds=1))).fired == 0
    await engine.tick(expected_breach)
    await engine.tick(expected_breach)
    assert (await _sla_events(db, tid))[(last.kind, "sla_breach")] == 1
    assert (await _clocks(db, tid))[last.kind].breached_at == expected_breach
    expected_escalation = cal.add(resume_at, left + 0.5 * last.target_s)
    assert (await engine.tick(expected_escalation - timedelta(seconds=1))).fired == 0
    assert (await engine.tick(expected_escalation)).fired == 1

    # Far beyond every target: each clock warned, breached, escalated exactly once.
    far = opened + timedelta(days=120)
    await engine.tick(far)
    await engine.tick(far)
    events = await _sla_events(db, tid)
    assert events == Counter({(k, kind): 1 for k in case.due
                              for kind in ("sla_warning", "sla_breach", "sla_escalation")})
    # Each event went to its level of the chain: one email and one webhook call.
    async with db.session() as s:
        pending = (await s.exec(select(SlaNotification).where(
            SlaNotification.ticket_id == tid, SlaNotification.sent_at == None))).all()  # noqa: E711
    assert pending == []
    assert len(smtp.messages) == len(hooks.calls) == 3 * len(case.due)
    levels = Counter(c["level"] for c in hooks.calls)
    assert levels == {lvl: len(case.due) for lvl in ("engineer", "lead", "manager")}
    assert sorted(m["To"] for m in smtp.messages) == sorted(
        f"{c['level']}@vendor.example" for c in hooks.calls)


async def test_met_clocks_never_fire_and_awaiting_release_does_not_breach(
        db: Database, make_site: MakeSite) -> None:
    site = await make_site(policy={"sla": {"classes": {"C": {"resolution": 86400}}}})
    engine = SlaEngine(db, SlaSettings())
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    async with db.session() as s:
        # the organisation's contract gives C a resolution clock; the release exempts it
        c = await service.open_ticket(s, site_id=site.id, source="fault", title="derating",
                                      fault_class="C", now=t0)
        await service.transition(s, pk(c), "awaiting_release", now=t0 + timedelta(minutes=2))
        a = await service.open_ticket(s, site_id=site.id, source="phone", title="trip",
                                      fault_class="A", now=t0)
        await service.set_diagnosis(s, pk(a), diagnosis="inverter IGBT", proposed_solution="swap",
                                    now=t0 + timedelta(minutes=4))
        await service.transition(s, pk(a), "resolved", now=t0 + timedelta(minutes=30))
    await engine.tick(t0 + timedelta(days=60))
    assert await _sla_events(db, pk(a)) == Counter()
    assert await _sla_events(db, pk(c)) == Counter()
    clocks = await _clocks(db, pk(c))
    assert clocks["resolution"].outcome == "exempt"
    assert clocks["processing"].outcome == "met"
