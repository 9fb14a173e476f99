"""Ticket pages: lists with SLA countdowns, the ticket with its timeline, phone notes,
diagnosis and proposed solution, and the forms engineers and customers use on it.

Every action goes through the ticket core (server/tickets/service.py), the same functions the
API calls, so the state machine and the SLA clocks behave the same from either door.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.api.deps import get_visible
from server.core.security import visible_sites
from server.errors import Forbidden, NotFound
from server.models import Site, Unit, User
from server.sla import clocks as sla_clocks
from server.sla.models import SlaClock
from server.tickets import service
from server.tickets import states as st
from server.tickets.models import Ticket, TicketEvent, TicketLink
from server.web.auth import Csrf, WebUser, is_staff
from server.web.live import topic
from server.web.render import render

router = APIRouter()

CLOCK_LABEL = {"response": "respond", "processing": "process", "resolution": "resolve",
               "delivery": "deliver"}
AT_RISK_LIMIT = 50
MAX_TICKETS_PAGE = 500


@dataclass(frozen=True)
class ClockView:
    """What a countdown shows: its state (ok, warning, breach, paused, stopped) and instants."""

    label: str
    state: str
    due: datetime | None
    warn_at: datetime | None
    remaining: timedelta

    @classmethod
    def of(cls, clock: SlaClock, now: datetime) -> ClockView:
        """The view of `clock` at `now`."""
        label = CLOCK_LABEL.get(clock.kind, clock.kind)
        left = timedelta(seconds=max(clock.target_s - sla_clocks.used_s(clock, now), 0.0))
        if clock.stopped_at is not None:
            state = "breach" if clock.outcome == "breached" else "stopped"
            return cls(label, state, None, None, left)
        if clock.running_since is None:
            return cls(label, "paused", None, None, left)
        due = sla_clocks.due_at(clock, 1.0)
        warn = sla_clocks.due_at(clock, clock.warn_fraction)
        state = "ok"
        if due is not None and now >= due:
            state = "breach"
        elif warn is not None and now >= warn:
            state = "warning"
        return cls(label, state, due, warn, left)


@dataclass(frozen=True)
class TicketRow:
    """A ticket with its site's name and its live clocks."""

    ticket: Ticket
    site_name: str
    site_code: str
    clocks: list[ClockView]


@dataclass(frozen=True)
class RiskRow:
    """A clock at or past its warning mark."""

    ticket: Ticket
    site_name: str
    clock: ClockView


async def clocks_by_ticket(session: AsyncSession, ticket_ids: list[int], now: datetime
                           ) -> dict[int, list[ClockView]]:
    """The live (not superseded) clocks of each ticket, as views."""
    out: dict[int, list[ClockView]] = defaultdict(list)
    if not ticket_ids:
        return out
    rows = (await session.exec(
        select(SlaClock).where(col(SlaClock.ticket_id).in_(ticket_ids),
                               col(SlaClock.outcome).is_distinct_from("superseded"))
        .order_by(col(SlaClock.id))
    )).all()
    for clock in rows:
        out[clock.ticket_id].append(ClockView.of(clock, now))
    return out


async def clocks_at_risk(session: AsyncSession, user: User, now: datetime) -> list[RiskRow]:
    """Running clocks of open tickets at or past their warning mark, most urgent first."""
    rows = (await session.exec(
        select(SlaClock, Ticket, Site.name)
        .join(Ticket, col(Ticket.id) == col(SlaClock.ticket_id))
        .join(Site, col(Site.id) == col(Ticket.site_id))
        .where(col(SlaClock.stopped_at).is_(None), col(SlaClock.running_since).is_not(None),
               col(Ticket.state).in_(st.OPEN_STATES), visible_sites(user, col(Ticket.site_id)))
    )).all()
    risky = []
    for clock, ticket, site_name in rows:
        view = ClockView.of(clock, now)
        if view.state in ("warning", "breach"):
            risky.append(RiskRow(ticket, site_name, view))
    risky.sort(key=lambda r: r.clock.due or now)
    return risky[:AT_RISK_LIMIT]


async def fault_clocks(session: AsyncSession, fault_ids: list[int], now: datetime
                       ) -> dict[int, tuple[int, ClockView | None]]:
    """For faults that opened a ticket: fault id -> (ticket id, its most urgent running clock).

    One countdown per fault keeps a 1,000-fault page light (docs/benchmarks.md); the ticket
    page shows all of a ticket's clocks.
    """
    if not fault_ids:
        return {}
    links = (await session.exec(
        select(TicketLink.ref, TicketLink.ticket_id)
        .where(TicketLink.kind == "fault", col(TicketLink.ref).in_([str(i) for i in fault_ids]))
    )).all()
    by_fault = {int(ref): tid for ref, tid in links if ref.isdigit()}
    urgent: dict[int, SlaClock] = {}
    if by_fault:
        rows = (await session.exec(  # plain columns first: no JSON to decode for 3 clocks
            select(SlaClock.id, SlaClock.ticket_id, SlaClock.due_at)
            .where(col(SlaClock.ticket_id).in_(sorted(set(by_fault.values()))),
                   col(SlaClock.stopped_at).is_(None), col(SlaClock.running_since).is_not(None),
                   col(SlaClock.due_at).is_not(None))
        )).all()
        soonest: dict[int, tuple[datetime, int]] = {}
        for clock_id, ticket_id, due in rows:
            if due is None:  # excluded by the query; for the type checker
                continue
            if ticket_id not in soonest or due < soonest[ticket_id][0]:
                soonest[ticket_id] = (due, clock_id or 0)
        chosen = [clock_id for _, clock_id in soonest.values()]
        for clock in (await session.exec(
            select(SlaClock).where(col(SlaClock.id).in_(chosen))
        )).all():
            urgent[clock.ticket_id] = clock
    views = {tid: ClockView.of(c, now) for tid, c in urgent.items()}
    return {fid: (tid, views.get(tid)) for fid, tid in by_fault.items()}


@topic("tickets")
async def _tickets_fingerprint(session: AsyncSession, user: User) -> tuple[Any, ...]:
    tickets = (await session.exec(
        select(func.count(), func.max(Ticket.updated_at))
        .where(visible_sites(user, col(Ticket.site_id)))
    )).one()
    events = (await session.exec(
        select(func.max(TicketEvent.id)).join(Ticket, col(Ticket.id) == col(TicketEvent.ticket_id))
        .where(visible_sites(user, col(Ticket.site_id)))
    )).one()
    return (*tuple(tickets), events)


async def _visible_ticket(session: AsyncSession, user: User, ticket_id: int) -> Ticket:
    return await get_visible(session, user, Ticket, ticket_id, col(Ticket.site_id))


@router.get("/tickets", response_class=HTMLResponse, include_in_schema=False)
async def tickets_page(
    request: Request, user: WebUser,
    show: Annotated[str, Query(pattern="^(open|all)$")] = "open",
) -> HTMLResponse:
    """Tickets of the visible sites with their SLA countdowns; the new-request form."""
    now = request.app.state.clock()
    async with request.app.state.db.session() as session:
        stmt = (select(Ticket, Site.name, Site.code).join(Site, col(Site.id) == col(Ticket.site_id))
                .where(visible_sites(user, col(Ticket.site_id))))
        if show == "open":
            stmt = stmt.where(col(Ticket.state).in_(st.OPEN_STATES))
        rows = (await session.exec(stmt.order_by(col(Ticket.created_at).desc(),
                                                 col(Ticket.id).desc())
                                   .limit(MAX_TICKETS_PAGE))).all()
        clocks = await clocks_by_ticket(session, [t.id or 0 for t, _, _ in rows], now)
        sites = (await session.exec(select(Site.id, Site.name)
                                    .where(visible_sites(user, col(Site.id)))
                                    .order_by(col(Site.name)))).all()
    tickets = [TicketRow(t, name, code, clocks.get(t.id or 0, [])) for t, name, code in rows]
    return render(request, "tickets.html", {"user": user, "tickets": tickets, "show": show,
                                            "sites": sites})


@router.post("/tickets", include_in_schema=False, dependencies=[Csrf])
async def open_ticket(
    request: Request, user: WebUser,
    site_id: Annotated[int, Form(ge=1)],
    title: Annotated[str, Form(min_length=1, max_length=200)],
    description: Annotated[str, Form(max_length=10_000)] = "",
    source: Annotated[str, Form(pattern="^(phone|portal|upgrade_request)$")] = "portal",
    fault_class: Annotated[str, Form(pattern="^[ABCD]?$")] = "",
) -> RedirectResponse:
    """A portal or upgrade request (anyone), or a phone request (engineers)."""
    if source == "phone" and not is_staff(user):
        raise Forbidden("only engineers record phone requests")
    now = request.app.state.clock()
    async with request.app.state.db.session() as session:
        site = (await session.exec(select(Site).where(
            Site.id == site_id, visible_sites(user, col(Site.id))))).first()
        if site is None:
            raise NotFound(f"site {site_id} not found")
        ticket = await service.open_ticket(
            session, site_id=site_id, source=source, title=title.strip(),
            fault_class=(fault_class or None) if is_staff(user) else None,
            description=description, actor=user.name, now=now)
        tid = ticket.id
    return RedirectResponse(f"/tickets/{tid}", status_code=303)


@router.get("/tickets/{ticket_id}", response_class=HTMLResponse, include_in_schema=False)
async def ticket_page(request: Request, user: WebUser, ticket_id: int) -> HTMLResponse:
    """The ticket: clocks, timeline, phone notes, diagnosis and proposed solution, links."""
    now = request.app.state.clock()
    async with request.app.state.db.session() as session:
        ticket = await _visible_ticket(session, user, ticket_id)
        site = await session.get(Site, ticket.site_id)
        events = (await session.exec(select(TicketEvent).where(TicketEvent.ticket_id == ticket_id)
                                     .order_by(col(TicketEvent.ts), col(TicketEvent.id)))).all()
        links = (await session.exec(select(TicketLink).where(TicketLink.ticket_id == ticket_id)
                                    .order_by(col(TicketLink.id)))).all()
        clocks = (await clocks_by_ticket(session, [ticket_id], now)).get(ticket_id, [])
        units = (await session.exec(select(Unit.device).where(
            col(Unit.id).in_(ticket.unit_ids or [0])))).all()
    phone = [e for e in events if e.kind == "phone_support"]
    moves = sorted(st.MOVES.get(ticket.state, frozenset()))
    return render(request, "ticket.html", {
        "user": user, "t": ticket, "site": site, "events": events, "links": links,
        "clocks": clocks, "phone": phone, "moves": moves, "units": units,
        "outcomes": service.PHONE_OUTCOMES,
    })


def _act(request: Request, ticket_id: int) -> RedirectResponse:
    return RedirectResponse(f"/tickets/{ticket_id}", status_code=303)


@router.post("/tickets/{ticket_id}/comment", include_in_schema=False, dependencies=[Csrf])
async def comment(request: Request, user: WebUser, ticket_id: int,
                  text: Annotated[str, Form(min_length=1, max_length=10_000)]
                  ) -> RedirectResponse:
    """A comment on the timeline (customers on their own tickets too)."""
    async with request.app.state.db.session() as session:
        await _visible_ticket(session, user, ticket_id)
        await service.record(session, ticket_id, "comment", text.strip(), actor=user.name,
                             now=request.app.state.clock())
    return _act(request, ticket_id)


def _staff_only(user: User) -> None:
    if not is_staff(user):
        raise Forbidden("only the vendor's engineers do this")


@router.post("/tickets/{ticket_id}/transition", include_in_schema=False, dependencies=[Csrf])
async def transition(request: Request, user: WebUser, ticket_id: int,
                     state: Annotated[str, Form(max_length=24)],
                     note: Annotated[str, Form(max_length=2000)] = "") -> RedirectResponse:
    """Move the ticket's state (the state machine refuses illegal moves with 409)."""
    _staff_only(user)
    async with request.app.state.db.session() as session:
        await _visible_ticket(session, user, ticket_id)
        await service.transition(session, ticket_id, state, actor=user.name, note=note,
                                 now=request.app.state.clock())
    return _act(request, ticket_id)


@router.post("/tickets/{ticket_id}/phone", include_in_schema=False, dependencies=[Csrf])
async def phone(request: Request, user: WebUser, ticket_id: int,
                notes: Annotated[str, Form(min_length=1, max_length=10_000)],
                outcome: Annotated[str, Form(max_length=32)]) -> RedirectResponse:
    """Notes of a support call and its outcome."""
    _staff_only(user)
    async with request.app.state.db.session() as session:
        await _visible_ticket(session, user, ticket_id)
        await service.phone_support(session, ticket_id, notes=notes, outcome=outcome,
                                    actor=user.name, now=request.app.state.clock())
    return _act(request, ticket_id)


@router.post("/tickets/{ticket_id}/diagnosis", include_in_schema=False, dependencies=[Csrf])
async def diagnosis(request: Request, user: WebUser, ticket_id: int,
                    diagnosis: Annotated[str, Form(min_length=1, max_length=10_000)],
                    proposed_solution: Annotated[str, Form(min_length=1, max_length=10_000)]
                    ) -> RedirectResponse:
    """The remote diagnosis and the proposed solution (meets the processing clock)."""
    _staff_only(user)
    async with request.app.state.db.session() as session:
        await _visible_ticket(session, user, ticket_id)
        await service.set_diagnosis(session, ticket_id, diagnosis=diagnosis,
                                    proposed_solution=proposed_solution, actor=user.name,
                                    now=request.app.state.clock())
    return _act(request, ticket_id)
