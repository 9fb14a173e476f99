"""`/api/v1/tickets`: service requests, their timeline, SLA clocks, links and spare parts.

Customers see, open (portal, upgrade request) and comment on the tickets of their own
organisation's sites; engineers and admins see all and do the rest: acknowledge and move the
state, assign, class, record phone support and the diagnosis with a proposed solution, link,
pause the clocks, reserve parts, and mark a release link installed (which closes the C/D
tickets that release fixes).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.api.deps import (
    CurrentUser,
    IdPath,
    IdQuery,
    NowDep,
    PageDep,
    SessionDep,
    StaffUser,
    get_visible,
    paginate,
)
from server.core.security import STAFF, visible_sites
from server.errors import Forbidden, InvalidInput, NotFound
from server.models import Site, Unit, User
from server.schemas import FaultClass, Page, Plain
from server.sla import clocks as sla_clocks
from server.tickets import parts, service
from server.tickets import states as st
from server.tickets.models import PartReservation, Ticket, TicketEvent, TicketLink
from server.tickets.schemas import (
    AssignRequest,
    BreachCause,
    ClassRequest,
    ClockPublic,
    CommentCreate,
    DiagnosisRequest,
    EventPublic,
    LinkCreate,
    LinkPublic,
    PauseRequest,
    PhoneRequest,
    ReservationPublic,
    ReserveRequest,
    State,
    TicketCreate,
    TicketDetail,
    TicketPublic,
    TransitionRequest,
)
from server.tickets.service import require_id

router = APIRouter(prefix="/tickets", tags=["tickets"])

SourceQuery = Annotated[str | None, Query(pattern="^(fault|phone|portal|upgrade_request)$")]


async def _detail(session: AsyncSession, ticket: Ticket) -> TicketDetail:
    tid = service.require_id(ticket.id)
    events = (await session.exec(select(TicketEvent).where(TicketEvent.ticket_id == tid)
                                 .order_by(col(TicketEvent.ts), col(TicketEvent.id)))).all()
    links = (await session.exec(select(TicketLink).where(TicketLink.ticket_id == tid)
                                .order_by(col(TicketLink.id)))).all()
    clocks = [c for c in await sla_clocks.clocks_of(session, tid) if c.outcome != "superseded"]
    reserved = (await session.exec(select(PartReservation).where(
        PartReservation.ticket_id == tid).order_by(col(PartReservation.id)))).all()
    return TicketDetail(
        **TicketPublic.model_validate(ticket).model_dump(),
        events=[EventPublic.model_validate(e) for e in events],
        links=[LinkPublic.model_validate(x) for x in links],
        clocks=[ClockPublic.model_validate(c) for c in clocks],
        parts=[ReservationPublic.model_validate(r) for r in reserved])


async def visible_ticket(session: SessionDep, user: CurrentUser, ticket_id: IdPath) -> Ticket:
    """The ticket of the path if the caller may see it (404 otherwise), checked before the
    body is read so that a missing ticket is 404 whatever the body."""
    return await get_visible(session, user, Ticket, ticket_id, col(Ticket.site_id))


TicketDep = Annotated[Ticket, Depends(visible_ticket)]


@router.get("", response_model=Page[TicketPublic])
async def list_tickets(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    state: Annotated[list[State] | None, Query()] = None,
    fault_class: Annotated[list[FaultClass] | None, Query(alias="class")] = None,
    site_id: IdQuery = None,
    org_id: IdQuery = None,
    source: SourceQuery = None,
    assignee: Annotated[Plain | None, Query(max_length=100)] = None,
    open_only: Annotated[bool, Query(alias="open", description="only open tickets")] = False,
) -> Page[Ticket]:
    """Tickets of the sites the caller may see, newest first; filters combine."""
    stmt = select(Ticket).where(visible_sites(user, col(Ticket.site_id)))
    if state:
        stmt = stmt.where(col(Ticket.state).in_(state))
    if open_only:
        stmt = stmt.where(col(Ticket.state).in_(st.OPEN_STATES))
    if fault_class:
        stmt = stmt.where(col(Ticket.fault_class).in_(fault_class))
    if site_id is not None:
        stmt = stmt.where(Ticket.site_id == site_id)
    if org_id is not None:
        stmt = stmt.where(Ticket.org_id == org_id)
    if source is not None:
        stmt = stmt.where(Ticket.source == source)
    if assignee is not None:
        stmt = stmt.where(Ticket.assignee == assignee)
    rows, total = await paginate(session, stmt, page, col(Ticket.created_at).desc(),
                                 col(Ticket.id).desc())
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{ticket_id}", response_model=TicketDetail)
async def get_ticket(session: SessionDep, user: CurrentUser, ticket: TicketDep) -> TicketDetail:
    """One ticket with its timeline, links, SLA clocks and parts."""
    return await _detail(session, ticket)


@router.post("", response_model=TicketDetail, status_code=201)
async def create_ticket(session: SessionDep, user: CurrentUser, now: NowDep,
                        body: TicketCreate) -> TicketDetail:
    """Open a service request: by phone (engineers), portal or upgrade request (anyone)."""
    if body.source == "phone" and user.role not in STAFF:
        raise Forbidden("only engineers record phone requests")
    site = await get_visible(session, user, Site, body.site_id, col(Site.id))
    if body.unit_ids:
        known = (await session.exec(select(Unit.id).where(
            col(Unit.id).in_(body.unit_ids), Unit.site_id == site.id))).all()
        if len(set(known)) != len(set(body.unit_ids)):
            raise InvalidInput("unit_ids must name units of the site")
    ticket = await service.open_ticket(
        session, site_id=service.require_id(site.id), source=body.source, title=body.title,
        fault_class=body.fault_class, description=body.description, unit_ids=body.unit_ids,
        actor=user.name, now=now)
    await session.commit()
    return await _detail(session, ticket)


@router.post("/{ticket_id}/comments", response_model=EventPublic, status_code=201)
async def comment(session: SessionDep, user: CurrentUser, now: NowDep, ticket: TicketDep,
                  body: CommentCreate) -> TicketEvent:
    """Add a comment to the timeline (customers on their own tickets too)."""
    ticket_id = require_id(ticket.id)
    if not body.text.strip():
        raise InvalidInput("a comment needs text")
    event = await service.record(session, ticket_id, "comment", body.text, actor=user.name,
                                 now=now)
    await session.commit()
    return event


async def _done(session: AsyncSession, ticket_id: int) -> TicketDetail:
    await session.commit()
    return await _detail(session, await service.get_ticket(session, ticket_id))


@router.post("/{ticket_id}/transition", response_model=TicketDetail)
async def transition(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                     body: TransitionRequest) -> TicketDetail:
    """Move the state (409 for a move the state machine forbids)."""
    ticket_id = require_id(ticket.id)
    await service.transition(session, ticket_id, body.state, actor=user.name, note=body.note,
                             now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/assign", response_model=TicketDetail)
async def assign(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                 body: AssignRequest) -> TicketDetail:
    """Give the ticket to an engineer."""
    ticket_id = require_id(ticket.id)
    if body.assignee is not None and (await session.exec(
            select(User).where(User.name == body.assignee))).first() is None:
        raise InvalidInput(f"no user {body.assignee!r}")
    await service.assign(session, ticket_id, body.assignee, actor=user.name, now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/class", response_model=TicketDetail)
async def set_class(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                    body: ClassRequest) -> TicketDetail:
    """Set or change the fault class (the new class's clocks start now)."""
    ticket_id = require_id(ticket.id)
    await service.classify(session, ticket_id, body.fault_class, actor=user.name, now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/diagnosis", response_model=TicketDetail)
async def diagnosis(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                    body: DiagnosisRequest) -> TicketDetail:
    """Record the diagnosis and the proposed solution (meets the processing clock)."""
    ticket_id = require_id(ticket.id)
    await service.set_diagnosis(session, ticket_id, diagnosis=body.diagnosis,
                                proposed_solution=body.proposed_solution, actor=user.name,
                                now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/phone", response_model=TicketDetail)
async def phone(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                body: PhoneRequest) -> TicketDetail:
    """Record telephone support: `solved` resolves; `needs_remote_support` leaves the ticket
    in progress for a remote-session request (which asks the customer's consent)."""
    ticket_id = require_id(ticket.id)
    await service.phone_support(session, ticket_id, notes=body.notes, outcome=body.outcome,
                                actor=user.name, now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/links", response_model=LinkPublic, status_code=201)
async def add_link(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                   body: LinkCreate) -> TicketLink:
    """Link a fault, session, release (`SERIES/VERSION`), part, plan or commissioning."""
    ticket_id = require_id(ticket.id)
    row = await service.link(session, ticket_id, body.kind, body.ref, state=body.state,
                             actor=user.name, now=now)
    await session.commit()
    return row


@router.post("/{ticket_id}/links/{link_id}/installed", response_model=TicketDetail)
async def release_link_installed(session: SessionDep, user: StaffUser, now: NowDep,
                                 ticket: TicketDep, link_id: IdPath) -> TicketDetail:
    """Mark a release link installed at the ticket's site: the C/D tickets it fixes close."""
    ticket_id = require_id(ticket.id)
    row = await session.get(TicketLink, link_id)
    if row is None or row.ticket_id != ticket_id or row.kind != "release":
        raise NotFound(f"ticket {ticket_id} has no release link {link_id}")
    series, _, version = row.ref.rpartition("/")
    await service.release_installed(session, site_id=ticket.site_id, series=series or "",
                                    version=version, fixes=[ticket_id], now=now)
    row.state = "installed"
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/pause", response_model=TicketDetail)
async def pause(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                body: PauseRequest) -> TicketDetail:
    """Stop the clocks while waiting on the customer (consent, window, personnel)."""
    ticket_id = require_id(ticket.id)
    await service.pause_clocks(session, ticket_id, body.reason, now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/resume", response_model=TicketDetail)
async def resume(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                 body: PauseRequest) -> TicketDetail:
    """Let the clocks run again (once no other pause holds them)."""
    ticket_id = require_id(ticket.id)
    await service.resume_clocks(session, ticket_id, body.reason, now=now)
    return await _done(session, ticket_id)


@router.post("/{ticket_id}/breach-cause", response_model=EventPublic, status_code=201)
async def breach_cause(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                       body: BreachCause) -> TicketEvent:
    """Say why a clock ran out; the SLA report shows it."""
    ticket_id = require_id(ticket.id)
    event = await service.record(session, ticket_id, "breach_cause", body.cause,
                                 actor=user.name, detail={"clock": body.clock}, now=now)
    await session.commit()
    return event


@router.post("/{ticket_id}/parts", response_model=ReservationPublic, status_code=201)
async def reserve_part(session: SessionDep, user: StaffUser, now: NowDep, ticket: TicketDep,
                       body: ReserveRequest) -> PartReservation:
    """Reserve a spare part (back-ordered, with a warning for A/B, when none is in stock)."""
    ticket_id = require_id(ticket.id)
    row = await parts.reserve(session, ticket_id, part_no=body.part_no, quantity=body.quantity,
                              depot=body.depot, actor=user.name, now=now)
    await session.commit()
    return row
