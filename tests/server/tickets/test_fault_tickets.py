"""Faults open tickets: A/B at once and grouped per incident, C/D per policy, escalation raises
the class, clearing is noted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from protocols.clock import ManualClock
from server.core.db import Database
from server.models import Fault, Unit
from server.sla.config import SlaSettings
from server.tickets.faults import FaultTickets
from server.tickets.models import Ticket, TicketEvent, TicketLink
from tests.server.tickets.conftest import MakeSite, SiteRef, pk

T0 = datetime(2026, 11, 7, 2, 0, tzinfo=UTC)


async def _fault(db: Database, site: SiteRef, device: str, code: str, cls: str,
                 at: datetime, hook: FaultTickets) -> Fault:
    async with db.session() as s:
        unit = (await s.exec(select(Unit).where(Unit.site_id == site.id,
                                                Unit.device == device))).one()
        fault = Fault(site_id=site.id, unit_id=pk(unit), code=code, fault_class=cls,
                      title=f"{code} on {device}", opened_at=at, last_seen_at=at)
        s.add(fault)
        await s.flush()
        hook.clock = ManualClock(at)
        await hook.on_opened(s, fault)
    return fault


async def _tickets(db: Database, site: SiteRef) -> list[tuple[str | None, list[int], int]]:
    """(class, unit ids, number of fault links) per ticket, oldest first."""
    async with db.session() as s:
        rows = (await s.exec(select(Ticket).where(Ticket.site_id == site.id)
                             .order_by(col(Ticket.id)))).all()
        out = []
        for t in rows:
            links = (await s.exec(select(TicketLink).where(TicketLink.ticket_id == t.id,
                                                           TicketLink.kind == "fault"))).all()
            out.append((t.fault_class, t.unit_ids, len(links)))
    return out


async def test_a_and_b_faults_of_one_incident_share_a_ticket(
        db: Database, make_site: MakeSite) -> None:
    site = await make_site(units=("u1", "u2", "u3"))
    hook = FaultTickets(SlaSettings(group_window_s=600))
    f1 = await _fault(db, site, "u1", "temp_high", "B", T0, hook)
    await _fault(db, site, "u2", "tripped", "A", T0 + timedelta(minutes=3), hook)
    await _fault(db, site, "u3", "soc_low", "B", T0 + timedelta(minutes=9), hook)
    await _fault(db, site, "u1", "tripped", "A", T0 + timedelta(minutes=30), hook)  # new incident
    tickets = await _tickets(db, site)
    assert len(tickets) == 2
    units = {}
    async with db.session() as s:
        for u in (await s.exec(select(Unit).where(Unit.site_id == site.id))).all():
            units[u.device] = pk(u)
    assert tickets[0] == ("A", sorted([units["u1"], units["u2"], units["u3"]]), 3)
    assert tickets[1] == ("A", [units["u1"]], 1)

    async with db.session() as s:
        cleared = await s.get(Fault, pk(f1))
        assert cleared is not None
        cleared.state = "cleared"
        await hook.on_cleared(s, cleared)
        events = (await s.exec(select(TicketEvent).where(
            col(TicketEvent.kind).in_(("fault_cleared", "fault_grouped", "classified")),
            col(TicketEvent.ticket_id).in_(
                select(Ticket.id).where(Ticket.site_id == site.id))
        ).order_by(col(TicketEvent.id)))).all()
    assert [e.kind for e in events] == ["classified", "fault_grouped", "fault_grouped",
                                        "fault_cleared"]


async def test_c_and_d_faults_follow_the_policy(db: Database, make_site: MakeSite) -> None:
    site = await make_site(units=("u1", "u2"))
    hook = FaultTickets(SlaSettings())
    await _fault(db, site, "u1", "derating", "C", T0, hook)
    await _fault(db, site, "u2", "derating", "C", T0 + timedelta(hours=5), hook)
    flap = await _fault(db, site, "u1", "comm_flapping", "D", T0, hook)
    assert [(c, n) for c, _, n in await _tickets(db, site)] == [("C", 2), ("D", 1)]

    async with db.session() as s:  # D -> C: the ticket follows
        fault = await s.get(Fault, pk(flap))
        assert fault is not None
        fault.escalated_from, fault.fault_class = "D", "C"
        await hook.on_escalated(s, fault)
    assert [c for c, _, _ in await _tickets(db, site)] == ["C", "C"]

    quiet = await make_site(units=("u1",))
    none = FaultTickets(SlaSettings(cd_faults="none"))
    await _fault(db, quiet, "u1", "derating", "C", T0, none)
    assert await _tickets(db, quiet) == []
    await _fault(db, quiet, "u1", "tripped", "A", T0, none)
    assert [c for c, _, _ in await _tickets(db, quiet)] == ["A"]


async def test_a_bad_sla_policy_does_not_stop_the_fault(
        db: Database, make_site: MakeSite, caplog: pytest.LogCaptureFixture) -> None:
    site = await make_site(units=("u1",), policy={"sla": {"hours": {"country": "XX"}}})
    hook = FaultTickets(SlaSettings())
    await _fault(db, site, "u1", "derating", "C", T0, hook)  # C/D: business-hours calendar
    assert await _tickets(db, site) == []
    assert "no public holidays known for 'XX'" in caplog.text
