"""The ticket service: what API routes, fault hooks and other features call.

Every function is async, takes the caller's `AsyncSession` first and never commits: a ticket
changes in the same transaction as whatever caused the change (a fault opening, a session
request, an upgrade installed). Time is always passed in (`now`), from the caller's clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.models import Fault, Site, Unit
from server.sla import clocks
from server.sla.policy import UNCLASSIFIED, UPGRADE
from server.tickets import states as st
from server.tickets.errors import (
    IllegalTransition,
    TicketInputError,
    TicketNotFound,
)
from server.tickets.models import Ticket, TicketEvent, TicketLink


async def get_ticket(session: AsyncSession, ticket_id: int, *, lock: bool = False) -> Ticket:
    """The ticket (locked for update when `lock`), or TicketNotFound."""
    query = select(Ticket).where(Ticket.id == ticket_id)
    if lock:
        query = query.with_for_update()
    ticket = (await session.exec(query.execution_options(populate_existing=True))).first()
    if ticket is None:
        raise TicketNotFound(f"no ticket {ticket_id}")
    return ticket


def require_id(value: int | None) -> int:
    """A flushed row's primary key."""
    if value is None:
        raise RuntimeError("row has no id: flush first")
    return value


def _class_key(source: str, fault_class: str | None) -> str:
    if source == "upgrade_request":
        return UPGRADE
    return fault_class or UNCLASSIFIED


async def open_ticket(
    session: AsyncSession,
    *,
    site_id: int,
    source: str,
    title: str,
    fault_class: str | None = None,
    description: str = "",
    unit_ids: Iterable[int] = (),
    actor: str | None = None,
    now: datetime,
) -> Ticket:
    """Open a ticket and start its SLA clocks (by class; an upgrade request: delivery)."""
    if source not in st.SOURCES:
        raise TicketInputError(f"source must be one of {', '.join(st.SOURCES)}")
    if fault_class is not None and fault_class not in st.CLASSES:
        raise TicketInputError("fault_class must be A, B, C or D")
    if not title.strip():
        raise TicketInputError("a ticket needs a title")
    site = await session.get(Site, site_id)
    if site is None:
        raise TicketNotFound(f"no site {site_id}")
    units = sorted(set(unit_ids))
    if units:
        found = (await session.exec(
            select(Unit.id).where(col(Unit.id).in_(units), Unit.site_id == site_id)
        )).all()
        if len(found) != len(units):
            raise TicketInputError("unit_ids must name units of the ticket's site")
    class_key = _class_key(source, fault_class)
    await clocks.check_terms(session, site, class_key)  # before anything is written
    ticket = Ticket(site_id=site_id, org_id=site.org_id, source=source,
                    fault_class=fault_class, title=title[:200], description=description,
                    unit_ids=units, created_by=actor, created_at=now, updated_at=now)
    session.add(ticket)
    await session.flush()
    ticket_id = require_id(ticket.id)
    await record(session, ticket_id, "opened", title, actor=actor,
                 detail={"source": source, "fault_class": fault_class}, now=now)
    await clocks.start_clocks(session, ticket_id, site, class_key, now=now)
    return ticket


async def record(
    session: AsyncSession,
    ticket_id: int,
    kind: str,
    text: str = "",
    *,
    actor: str | None = None,
    detail: Mapping[str, Any] | None = None,
    now: datetime,
) -> TicketEvent:
    """Append an entry to the ticket's timeline."""
    ticket = await session.get(Ticket, ticket_id)
    if ticket is None:
        raise TicketNotFound(f"no ticket {ticket_id}")
    ticket.updated_at = max(ticket.updated_at, now)
    event = TicketEvent(ticket_id=ticket_id, ts=now, kind=kind[:32], text=text, actor=actor,
                        detail=dict(detail or {}))
    session.add(event)
    await session.flush()
    return event


async def link(
    session: AsyncSession,
    ticket_id: int,
    kind: str,
    ref: str | int,
    *,
    now: datetime,
    state: str | None = None,
    actor: str | None = None,
) -> TicketLink:
    """Tie the ticket to a fault, session, release, part, plan or commissioning (idempotent)."""
    if kind not in st.LINK_KINDS:
        raise TicketInputError(f"link kind must be one of {', '.join(st.LINK_KINDS)}")
    ref = str(ref)
    existing = (await session.exec(
        select(TicketLink).where(TicketLink.ticket_id == ticket_id, TicketLink.kind == kind,
                                 TicketLink.ref == ref)
    )).first()
    if existing is not None:
        return existing
    await get_ticket(session, ticket_id)
    row = TicketLink(ticket_id=ticket_id, kind=kind, ref=ref[:128], state=state, created_at=now)
    session.add(row)
    await session.flush()
    await record(session, ticket_id, "linked", f"{kind} {ref}", actor=actor,
                 detail={"kind": kind, "ref": ref, "state": state}, now=now)
    return row


def _check_reason(reason: str) -> None:
    if reason not in clocks.PAUSE_REASONS:
        raise TicketInputError(
            f"pause reason must be one of {', '.join(sorted(clocks.PAUSE_REASONS))}")


async def pause_clocks(session: AsyncSession, ticket_id: int, reason: str, *,
                       now: datetime) -> None:
    """Stop the ticket's clocks while waiting on the customer (consent, window, personnel)."""
    _check_reason(reason)
    await get_ticket(session, ticket_id, lock=True)
    await clocks.pause(session, ticket_id, reason, now=now)
    await record(session, ticket_id, "clocks_paused", reason, detail={"reason": reason}, now=now)


async def resume_clocks(session: AsyncSession, ticket_id: int, reason: str, *,
                        now: datetime) -> None:
    """Undo `pause_clocks(reason)`; clocks run again when no other pause holds them."""
    _check_reason(reason)
    await get_ticket(session, ticket_id, lock=True)
    await clocks.resume(session, ticket_id, reason, now=now)
    await record(session, ticket_id, "clocks_resumed", reason, detail={"reason": reason},
                 now=now)


async def transition(
    session: AsyncSession,
    ticket_id: int,
    state: str,
    *,
    actor: str | None = None,
    note: str = "",
    now: datetime,
) -> Ticket:
    """Move the ticket along its state machine (IllegalTransition otherwise), with clock effects."""
    if state not in st.STATES:
        raise TicketInputError(f"state must be one of {', '.join(st.STATES)}")
    ticket = await get_ticket(session, ticket_id, lock=True)
    current = ticket.state
    if not st.legal(current, state):
        raise IllegalTransition(f"ticket {ticket_id} cannot go from {current} to {state}")
    if state == st.AWAITING_RELEASE and ticket.fault_class in ("A", "B"):
        raise IllegalTransition("class A and B faults are resolved, not left for a release")
    ticket.state = state
    ticket.updated_at = now
    if ticket.acknowledged_at is None:
        ticket.acknowledged_at = now
        await clocks.stop(session, ticket_id, ("response",), "met", now=now)
    if current == st.WAITING:
        await clocks.resume(session, ticket_id, "customer", now=now)
    if state == st.WAITING:
        await clocks.pause(session, ticket_id, "customer", now=now)
    elif state == st.AWAITING_RELEASE:
        await clocks.stop(session, ticket_id, ("processing",), "met", now=now)
        await clocks.stop(session, ticket_id, ("resolution",), "exempt", now=now)
    elif state in (st.RESOLVED, st.CLOSED):
        if ticket.resolved_at is None:
            ticket.resolved_at = now
        if state == st.CLOSED:
            ticket.closed_at = now
        await clocks.stop(session, ticket_id, clocks.CLOCK_KINDS, "met", now=now)
    elif current in (st.RESOLVED, st.CLOSED):
        ticket.resolved_at = ticket.closed_at = None
    kind = "reopened" if current in (st.RESOLVED, st.CLOSED) else "state"
    await record(session, ticket_id, kind, note, actor=actor,
                 detail={"from": current, "to": state}, now=now)
    return ticket


async def assign(session: AsyncSession, ticket_id: int, assignee: str | None, *,
                 actor: str | None = None, now: datetime) -> Ticket:
    """Give the ticket to an engineer (the first level of its escalation chain)."""
    ticket = await get_ticket(session, ticket_id, lock=True)
    ticket.assignee = assignee
    await record(session, ticket_id, "assigned", assignee or "", actor=actor,
                 detail={"assignee": assignee}, now=now)
    return ticket


async def set_diagnosis(session: AsyncSession, ticket_id: int, *, diagnosis: str,
                        proposed_solution: str, actor: str | None = None,
                        now: datetime) -> Ticket:
    """Clause 1: the remote diagnosis and the proposed solution; meets the processing clock."""
    if not diagnosis.strip() or not proposed_solution.strip():
        raise TicketInputError("both a diagnosis and a proposed solution are needed")
    ticket = await get_ticket(session, ticket_id, lock=True)
    ticket.diagnosis, ticket.proposed_solution = diagnosis, proposed_solution
    if ticket.acknowledged_at is None:
        ticket.acknowledged_at = now
        await clocks.stop(session, ticket_id, ("response",), "met", now=now)
    await clocks.stop(session, ticket_id, ("processing",), "met", now=now)
    await record(session, ticket_id, "diagnosis", diagnosis, actor=actor,
                 detail={"proposed_solution": proposed_solution}, now=now)
    return ticket


PHONE_OUTCOMES = ("solved", "needs_remote_support", "follow_up")


async def phone_support(session: AsyncSession, ticket_id: int, *, notes: str, outcome: str,
                        actor: str | None = None, now: datetime) -> Ticket:
    """Record a support call. `solved` resolves the ticket; `needs_remote_support` leaves it
    in progress, ready for a remote-session request (which asks the customer's consent)."""
    if outcome not in PHONE_OUTCOMES:
        raise TicketInputError(f"outcome must be one of {', '.join(PHONE_OUTCOMES)}")
    ticket = await get_ticket(session, ticket_id, lock=True)
    await record(session, ticket_id, "phone_support", notes, actor=actor,
                 detail={"outcome": outcome}, now=now)
    if outcome == "solved":
        if ticket.state not in (st.RESOLVED, st.CLOSED):
            return await transition(session, ticket_id, st.RESOLVED, actor=actor,
                                    note="solved by telephone support", now=now)
    elif ticket.state in (st.NEW, st.ACKNOWLEDGED):
        return await transition(session, ticket_id, st.IN_PROGRESS, actor=actor,
                                note=f"after telephone support: {outcome}", now=now)
    return ticket


async def classify(session: AsyncSession, ticket_id: int, fault_class: str, *,
                   actor: str | None = None, now: datetime) -> Ticket:
    """Set or change the class; open clocks of the old class give way to the new class's
    (started now; a response already met stays met)."""
    if fault_class not in st.CLASSES:
        raise TicketInputError("fault_class must be A, B, C or D")
    ticket = await get_ticket(session, ticket_id, lock=True)
    if ticket.fault_class == fault_class or ticket.source == "upgrade_request":
        return ticket
    site = await session.get(Site, ticket.site_id)
    if site is None:
        raise TicketNotFound(f"the site of ticket {ticket_id} is gone")
    old = ticket.fault_class
    ticket.fault_class = fault_class
    existing = {c.kind: c for c in await clocks.clocks_of(session, ticket_id)}
    met = {k for k, c in existing.items() if c.stopped_at is not None and c.outcome != "superseded"}
    await clocks.stop(session, ticket_id, clocks.CLOCK_KINDS, "superseded", now=now)
    if ticket.state in st.OPEN_STATES:
        want = tuple(k for k in clocks.CLOCK_KINDS if k not in met)
        await clocks.start_clocks(session, ticket_id, site, fault_class, now=now, kinds=want)
    await record(session, ticket_id, "classified", f"{old or '-'} -> {fault_class}",
                 actor=actor, detail={"from": old, "to": fault_class}, now=now)
    return ticket


def _fix_refs(fixes: Iterable[str | int]) -> tuple[set[int], set[str]]:
    ids: set[int] = set()
    codes: set[str] = set()
    for fix in fixes:
        text = str(fix).strip()
        if text.lstrip("#").isdigit():
            ids.add(int(text.lstrip("#")))
        elif text:
            codes.add(text)
    return ids, codes


async def release_installed(
    session: AsyncSession,
    *,
    site_id: int,
    series: str,
    version: str,
    fixes: Iterable[str | int],
    now: datetime,
) -> list[int]:
    """A release is installed at a site: close its open C/D tickets (and upgrade requests)
    that the release fixes.

    `fixes` holds ticket ids (`123` or `"#123"`) and fault codes; a ticket qualifies when its
    id is named, or a fault linked to it has a named code, or it has a release link whose ref
    is `version` or `series/version`. Tickets whose units are all of another series are left.
    Returns the ids of the tickets closed.
    """
    ids, codes = _fix_refs(fixes)
    refs = {version, f"{series}/{version}"}
    candidates = (await session.exec(
        select(Ticket).where(Ticket.site_id == site_id, col(Ticket.state).in_(st.OPEN_STATES),
                             sa.or_(col(Ticket.fault_class).in_(("C", "D")),
                                    col(Ticket.source) == "upgrade_request"))
    )).all()
    closed: list[int] = []
    for ticket in candidates:
        tid = require_id(ticket.id)
        links = (await session.exec(
            select(TicketLink).where(TicketLink.ticket_id == tid)
        )).all()
        release_links = [x for x in links if x.kind == "release" and x.ref in refs]
        fault_ids = [int(x.ref) for x in links if x.kind == "fault" and x.ref.isdigit()]
        fault_codes: set[str] = set()
        if fault_ids:
            fault_codes = set((await session.exec(
                select(Fault.code).where(col(Fault.id).in_(fault_ids))
            )).all())
        if not (tid in ids or fault_codes & codes or release_links):
            continue
        if not await _series_matches(session, ticket, series):
            continue
        for row in release_links:
            row.state = "installed"
        await link(session, tid, "release", f"{series}/{version}", state="installed",
                   now=now)
        await transition(session, tid, st.CLOSED,
                         note=f"fixed by release {series} {version}, installed at the site",
                         now=now)
        closed.append(tid)
    return closed


async def _series_matches(session: AsyncSession, ticket: Ticket, series: str) -> bool:
    if not ticket.unit_ids:
        return True
    found = (await session.exec(
        select(Unit.series).where(col(Unit.id).in_(ticket.unit_ids))
    )).all()
    return any(s is None or s == series for s in found)
