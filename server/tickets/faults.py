"""Faults become tickets: the fault engine's callbacks, hooked up by the server process.

Class A and B faults open a ticket at once (clause 3 (1): 7x24, immediate response); the
faults of one incident, i.e. A/B faults of the same site opened within `group_window_s` of
the ticket, join that ticket instead of opening more (the site row is locked while deciding,
so two processes cannot open two tickets for one incident). C and D follow `cd_faults`:
`ticket` (one open ticket per site and fault code, later closed by the release that fixes
it) or `none`. A fault that escalates (B->A, D->C) raises its ticket's class; a cleared fault
is noted on the timeline (an engineer still resolves the ticket).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from server.faults.engine import FaultEngine
from server.models import Fault, Site
from server.sla.config import SlaSettings
from server.sla.errors import SlaConfigError
from server.tickets import service
from server.tickets import states as st
from server.tickets.models import Ticket, TicketLink
from server.tickets.service import require_id

log = logging.getLogger(__name__)

SEVERITY = {"A": 0, "B": 1, "C": 2, "D": 3}


class FaultTickets:
    """Opens, groups, re-classes and annotates tickets as faults come and go."""

    def __init__(self, settings: SlaSettings | None = None, clock: Clock | None = None) -> None:
        self.settings = settings or SlaSettings()
        self.clock = clock or SystemClock()

    def attach(self, engine: FaultEngine) -> None:
        """Subscribe to the engine's fault callbacks."""
        engine.on_fault_opened.append(self.on_opened)
        engine.on_fault_escalated.append(self.on_escalated)
        engine.on_fault_cleared.append(self.on_cleared)

    async def on_opened(self, session: AsyncSession, fault: Fault) -> None:
        """A new fault: join the incident's ticket or open one (A/B; C/D per policy)."""
        if fault.fault_class in ("C", "D") and self.settings.cd_faults == "none":
            return
        now = self.clock.now()
        await self._lock_site(session, fault.site_id)
        ticket = await self._incident(session, fault)
        if ticket is None:
            try:
                ticket = await service.open_ticket(
                    session, site_id=fault.site_id, source="fault", title=fault.title,
                    fault_class=fault.fault_class, unit_ids=[fault.unit_id],
                    description=f"fault {fault.code} on unit {fault.unit_id}", now=now)
            except SlaConfigError as exc:  # never let a bad SLA policy stop ingest
                log.error("no ticket for fault %s at site %s: %s", fault.id, fault.site_id, exc)
                return
        else:
            await self._join(session, ticket, fault, now)
        await service.link(session, require_id(ticket.id), "fault", require_id(fault.id), now=now)

    async def on_escalated(self, session: AsyncSession, fault: Fault) -> None:
        """The fault got worse: its ticket takes the more severe class (or opens if none)."""
        tickets = await self._tickets_of(session, fault)
        if not tickets:
            await self.on_opened(session, fault)
            return
        now = self.clock.now()
        for ticket in tickets:
            if _worse(fault.fault_class, ticket.fault_class):
                await service.classify(session, require_id(ticket.id), fault.fault_class, now=now)
            await service.record(session, require_id(ticket.id), "fault_escalated",
                                 f"{fault.code}: {fault.escalated_from} -> {fault.fault_class}",
                                 detail={"fault": fault.id}, now=now)

    async def on_cleared(self, session: AsyncSession, fault: Fault) -> None:
        """Note the clearing on the fault's open tickets."""
        now = self.clock.now()
        for ticket in await self._tickets_of(session, fault):
            await service.record(session, require_id(ticket.id), "fault_cleared", fault.code,
                                 detail={"fault": fault.id}, now=now)

    async def _lock_site(self, session: AsyncSession, site_id: int) -> None:
        await session.exec(select(Site.id).where(Site.id == site_id).with_for_update())

    async def _incident(self, session: AsyncSession, fault: Fault) -> Ticket | None:
        """The open ticket this fault belongs to, if any."""
        base = select(Ticket).where(Ticket.site_id == fault.site_id, Ticket.source == "fault",
                                    col(Ticket.state).in_(st.OPEN_STATES))
        if fault.fault_class in ("A", "B"):
            since = fault.opened_at - timedelta(seconds=self.settings.group_window_s)
            query = base.where(col(Ticket.fault_class).in_(("A", "B")),
                               col(Ticket.created_at) >= since)
        else:
            same_code = (select(TicketLink.ticket_id)
                         .join(Fault, col(TicketLink.ref) == sa.cast(Fault.id, sa.String))
                         .where(TicketLink.kind == "fault", Fault.code == fault.code))
            query = base.where(col(Ticket.fault_class).in_(("C", "D")),
                               col(Ticket.id).in_(same_code))
        return (await session.exec(query.order_by(col(Ticket.created_at).desc()))).first()

    async def _join(self, session: AsyncSession, ticket: Ticket, fault: Fault,
                    now: datetime) -> None:
        tid = require_id(ticket.id)
        if fault.unit_id not in ticket.unit_ids:
            ticket.unit_ids = sorted({*ticket.unit_ids, fault.unit_id})
        if _worse(fault.fault_class, ticket.fault_class):
            await service.classify(session, tid, fault.fault_class, now=now)
        await service.record(session, tid, "fault_grouped", f"{fault.code}: {fault.title}",
                             detail={"fault": fault.id, "class": fault.fault_class}, now=now)

    async def _tickets_of(self, session: AsyncSession, fault: Fault) -> list[Ticket]:
        ids = select(TicketLink.ticket_id).where(TicketLink.kind == "fault",
                                                 TicketLink.ref == str(fault.id))
        return list((await session.exec(
            select(Ticket).where(col(Ticket.id).in_(ids), col(Ticket.state).in_(st.OPEN_STATES))
        )).all())


def _worse(new: str, old: str | None) -> bool:
    return old is None or SEVERITY.get(new, 9) < SEVERITY.get(old, 9)

