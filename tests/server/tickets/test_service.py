"""The ticket core other features call: open, record, link, pause/resume, transition, release."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from server.core.db import Database
from server.models import Fault, Unit
from server.sla.models import SlaClock, SlaTimer
from server.tickets import service
from server.tickets.errors import IllegalTransition, TicketInputError, TicketNotFound
from server.tickets.models import TicketEvent, TicketLink
from tests.server.tickets.conftest import MakeSite, pk

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday


async def _clocks(db: Database, ticket_id: int) -> dict[str, SlaClock]:
    async with db.session() as s:
        rows = (await s.exec(select(SlaClock).where(SlaClock.ticket_id == ticket_id))).all()
    return {c.kind: c for c in rows if c.outcome != "superseded"}


async def _timers(db: Database, ticket_id: int) -> dict[tuple[str, str], datetime | None]:
    async with db.session() as s:
        rows = (await s.exec(select(SlaTimer, SlaClock).where(
            SlaTimer.ticket_id == ticket_id, SlaTimer.clock_id == SlaClock.id))).all()
    return {(c.kind, t.kind): t.due_at for t, c in rows if c.outcome != "superseded"}


async def test_open_a_ticket_starts_its_clocks(db: Database, make_site: MakeSite) -> None:
    site = await make_site()
    async with db.session() as s:
        t = await service.open_ticket(s, site_id=site.id, source="phone", title="no output",
                                      fault_class="A", actor="eve", now=T0)
    assert (t.state, t.org_id) == ("new", site.org_id)
    clocks = await _clocks(db, pk(t))
    assert {k: c.due_at for k, c in clocks.items()} == {
        "response": T0 + timedelta(minutes=5),
        "processing": T0 + timedelta(minutes=15),
        "resolution": T0 + timedelta(hours=1),
    }
    timers = await _timers(db, pk(t))
    assert timers[("resolution", "warning")] == T0 + timedelta(minutes=45)
    assert timers[("resolution", "breach")] == T0 + timedelta(hours=1)
    assert timers[("resolution", "escalation")] == T0 + timedelta(minutes=90)


async def test_transitions_meet_clocks_and_refuse_illegal_moves(
        db: Database, make_site: MakeSite) -> None:
    site = await make_site()
    async with db.session() as s:
        t = await service.open_ticket(s, site_id=site.id, source="portal", title="hot",
                                      fault_class="B", now=T0)
    async with db.session() as s:
        await service.transition(s, pk(t), "acknowledged", actor="eve",
                                 now=T0 + timedelta(minutes=2))
    clocks = await _clocks(db, pk(t))
    assert clocks["response"].outcome == "met"
    assert clocks["response"].stopped_at == T0 + timedelta(minutes=2)
    assert clocks["processing"].stopped_at is None
    with pytest.raises(IllegalTransition):
        async with db.session() as s:
            await service.transition(s, pk(t), "new", now=T0)
    with pytest.raises(IllegalTransition):  # A/B are never left for a release
        async with db.session() as s:
            await service.transition(s, pk(t), "awaiting_release", now=T0)
    with pytest.raises(TicketInputError):
        async with db.session() as s:
            await service.transition(s, pk(t), "bogus", now=T0)
    with pytest.raises(TicketNotFound):
        async with db.session() as s:
            await service.transition(s, 10**9, "closed", now=T0)
    async with db.session() as s:
        await service.transition(s, pk(t), "resolved", now=T0 + timedelta(minutes=50))
    clocks = await _clocks(db, pk(t))
    assert all(c.outcome == "met" for c in clocks.values())
    async with db.session() as s:
        events = (await s.exec(select(TicketEvent).where(TicketEvent.ticket_id == pk(t)))).all()
    assert [e.kind for e in events] == ["opened", "state", "state"]


async def test_pause_and_resume_move_the_due_times(db: Database, make_site: MakeSite) -> None:
    site = await make_site()
    async with db.session() as s:
        t = await service.open_ticket(s, site_id=site.id, source="phone", title="x",
                                      fault_class="A", now=T0)
        await service.transition(s, pk(t), "in_progress", now=T0 + timedelta(minutes=1))
    async with db.session() as s:
        await service.pause_clocks(s, pk(t), "consent", now=T0 + timedelta(minutes=10))
        await service.pause_clocks(s, pk(t), "window", now=T0 + timedelta(minutes=11))
    clocks = await _clocks(db, pk(t))
    assert clocks["resolution"].due_at is None
    assert clocks["resolution"].consumed_s == 600
    async with db.session() as s:
        await service.resume_clocks(s, pk(t), "consent", now=T0 + timedelta(minutes=30))
    assert (await _clocks(db, pk(t)))["resolution"].due_at is None  # still waiting on the window
    async with db.session() as s:
        await service.resume_clocks(s, pk(t), "window", now=T0 + timedelta(minutes=40))
    clocks = await _clocks(db, pk(t))
    assert clocks["resolution"].due_at == T0 + timedelta(minutes=90)
    assert (await _timers(db, pk(t)))[("resolution", "warning")] == T0 + timedelta(minutes=75)
    with pytest.raises(TicketInputError):
        async with db.session() as s:
            await service.pause_clocks(s, pk(t), "lunch", now=T0)


async def test_links_are_idempotent(db: Database, make_site: MakeSite) -> None:
    site = await make_site()
    async with db.session() as s:
        t = await service.open_ticket(s, site_id=site.id, source="portal", title="x", now=T0)
        a = await service.link(s, pk(t), "session", 17, now=T0)
        b = await service.link(s, pk(t), "session", "17", now=T0)
        assert pk(a) == pk(b)
        with pytest.raises(TicketInputError):
            await service.link(s, pk(t), "banana", "1", now=T0)


async def test_release_installed_closes_the_c_and_d_tickets_it_fixes(
        db: Database, make_site: MakeSite) -> None:
    site = await make_site(units=("bess-1",), series="EMU-BS")
    async with db.session() as s:
        unit = (await s.exec(select(Unit).where(Unit.site_id == site.id))).one()
        fault = Fault(site_id=site.id, unit_id=pk(unit), code="derating", fault_class="C",
                      title="derating", opened_at=T0, last_seen_at=T0)
        s.add(fault)
        await s.flush()
        by_code = await service.open_ticket(s, site_id=site.id, source="fault", title="derating",
                                            fault_class="C", unit_ids=[pk(unit)], now=T0)
        await service.link(s, pk(by_code), "fault", pk(fault), now=T0)
        await service.transition(s, pk(by_code), "awaiting_release", now=T0)
        by_link = await service.open_ticket(s, site_id=site.id, source="phone", title="slow",
                                            fault_class="D", now=T0)
        await service.link(s, pk(by_link), "release", "EMU-BS/2.1.0", now=T0)
        other = await service.open_ticket(s, site_id=site.id, source="phone", title="other",
                                          fault_class="C", now=T0)
        major = await service.open_ticket(s, site_id=site.id, source="phone", title="trip",
                                          fault_class="A", now=T0)
    later = T0 + timedelta(days=3)
    async with db.session() as s:
        closed = await service.release_installed(
            s, site_id=site.id, series="EMU-BS", version="2.1.0",
            fixes=["derating", f"#{pk(major)}"], now=later)
    assert sorted(closed) == sorted([pk(by_code), pk(by_link)])
    async with db.session() as s:
        for t, state in ((by_code, "closed"), (by_link, "closed"), (other, "new"),
                         (major, "new")):
            assert (await service.get_ticket(s, pk(t))).state == state
        links = (await s.exec(select(TicketLink).where(TicketLink.ticket_id == pk(by_link),
                                                       TicketLink.kind == "release"))).all()
    assert [x.state for x in links] == ["installed"]
    clocks = await _clocks(db, pk(by_code))
    assert clocks["processing"].outcome == "met"
    assert "resolution" not in clocks  # C/D: solved by a release, no resolution clock


async def test_classify_moves_a_ticket_to_the_new_class_clocks(
        db: Database, make_site: MakeSite) -> None:
    site = await make_site()
    async with db.session() as s:
        t = await service.open_ticket(s, site_id=site.id, source="phone", title="x", now=T0)
        await service.transition(s, pk(t), "acknowledged", now=T0 + timedelta(minutes=1))
        await service.classify(s, pk(t), "B", now=T0 + timedelta(minutes=3))
    clocks = await _clocks(db, pk(t))
    assert clocks["response"].outcome == "met"
    assert clocks["processing"].due_at == T0 + timedelta(minutes=33)
    assert clocks["resolution"].due_at == T0 + timedelta(minutes=123)


async def test_phone_support_outcomes(db: Database, make_site: MakeSite) -> None:
    site = await make_site()
    async with db.session() as s:
        a = await service.open_ticket(s, site_id=site.id, source="phone", title="a",
                                      fault_class="B", now=T0)
        b = await service.open_ticket(s, site_id=site.id, source="phone", title="b",
                                      fault_class="B", now=T0)
        await service.phone_support(s, pk(a), notes="reset breaker", outcome="solved", now=T0)
        await service.phone_support(s, pk(b), notes="needs logs", outcome="needs_remote_support",
                                    now=T0)
        assert a.state == "resolved"
        assert b.state == "in_progress"
        with pytest.raises(TicketInputError):
            await service.phone_support(s, pk(b), notes="", outcome="maybe", now=T0)
