"""Remote-session pages: the engineer requests, the customer approves or denies, either
revokes an active session, and anyone who may see the session replays its recordings.

The pages call the same lifecycle (`SessionOps`, server/sessions/ops.py) as the API, taken
from the API application when it has one (so approvals reach the agent over the command
channel), so who may do what is decided in one place.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.sessions import Scope
from server.api.deps import get_visible
from server.core.security import visible_sites
from server.errors import InvalidInput, NotFound
from server.models import Site, Unit, User
from server.sessions import service
from server.sessions.models import RemoteSession, SessionRecording
from server.sessions.ops import SessionOps
from server.tickets import states as ticket_states
from server.tickets.models import Ticket
from server.web.auth import Csrf, WebUser
from server.web.live import topic
from server.web.render import render

router = APIRouter()

LIVE_STATES = ("requested", "approved", "active")
MAX_ROWS = 200
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def ops_of(request: Request) -> SessionOps:
    """The process's session lifecycle (the API app's, which knows the agent link)."""
    parent = getattr(request.app.state, "parent", None)
    ops = getattr(parent.state, "sessions", None) if parent is not None else None
    if isinstance(ops, SessionOps):
        return ops
    fallback: SessionOps | None = getattr(request.app.state, "session_ops", None)
    if fallback is None:
        fallback = SessionOps()
        request.app.state.session_ops = fallback
    return fallback


@topic("sessions")
async def _sessions_fingerprint(session: AsyncSession, user: User) -> tuple[Any, ...]:
    row = (await session.exec(
        select(func.count(), func.max(RemoteSession.requested_at),
               func.max(RemoteSession.decided_at), func.max(RemoteSession.ended_at))
        .where(visible_sites(user, col(RemoteSession.site_id)))
    )).one()
    active = (await session.exec(
        select(func.count(), func.max(RemoteSession.first_connected_at))
        .where(col(RemoteSession.state).in_(LIVE_STATES),
               visible_sites(user, col(RemoteSession.site_id)))
    )).one()
    return (*tuple(row), *tuple(active))


@router.get("/sessions", response_class=HTMLResponse, include_in_schema=False)
async def sessions_page(request: Request, user: WebUser) -> HTMLResponse:
    """Requests waiting for consent, live sessions, and recent ones; the request form."""
    async with request.app.state.db.session() as session:
        rows = (await session.exec(
            select(RemoteSession, Site.name, Site.code)
            .join(Site, col(Site.id) == col(RemoteSession.site_id))
            .where(visible_sites(user, col(RemoteSession.site_id)))
            .order_by(col(RemoteSession.requested_at).desc()).limit(MAX_ROWS)
        )).all()
        tickets = (await session.exec(
            select(Ticket.id, Ticket.title, Site.name)
            .join(Site, col(Site.id) == col(Ticket.site_id))
            .where(col(Ticket.state).in_(ticket_states.OPEN_STATES),
                   visible_sites(user, col(Ticket.site_id)))
            .order_by(col(Ticket.id).desc()).limit(MAX_ROWS)
        )).all()
    waiting = [r for r in rows if r[0].state == "requested"]
    live = [r for r in rows if r[0].state in ("approved", "active")]
    done = [r for r in rows if r[0].state not in LIVE_STATES]
    return render(request, "sessions.html", {"user": user, "waiting": waiting, "live": live,
                                             "done": done, "tickets": tickets})


@router.post("/sessions", include_in_schema=False, dependencies=[Csrf])
async def request_session(
    request: Request, user: WebUser,
    ticket_id: Annotated[int, Form(ge=1)],
    reason: Annotated[str, Form(min_length=1, max_length=2000)],
    units: Annotated[str, Form(max_length=2000)] = "",
    shell: Annotated[bool, Form()] = False,
    minutes: Annotated[int, Form(ge=1, le=480)] = 60,
) -> RedirectResponse:
    """An engineer asks the customer for access (the ticket's clocks wait for consent)."""
    names = tuple(u for u in re.split(r"[\s,]+", units) if u)
    try:
        scope = Scope(shell=shell, units=names)
    except ValueError as exc:
        raise InvalidInput(f"units: {exc}") from None
    async with request.app.state.db.session() as session:
        await get_visible(session, user, Ticket, ticket_id, col(Ticket.site_id))
        row = await ops_of(request).request(
            session, user, ticket_id=ticket_id, reason=reason, scope=scope,
            max_duration_s=minutes * 60, now=request.app.state.clock())
        sid = row.id
    return RedirectResponse(f"/sessions/{sid}", status_code=303)


@router.get("/sessions/{session_id}", response_class=HTMLResponse, include_in_schema=False)
async def session_page(request: Request, user: WebUser, session_id: str) -> HTMLResponse:
    """One session: its state and deadlines, the decision buttons, audit log, recordings."""
    async with request.app.state.db.session() as session:
        row = await service.visible_session(session, user, session_id[:16])
        site = await session.get(Site, row.site_id)
        engineer = await session.get(User, row.engineer_id)
        audit = await service.audit_entries(session, row.id)
        chain = await service.verify_audit(session, row.id)
        recordings = (await session.exec(
            select(SessionRecording.id, SessionRecording.name, SessionRecording.started_at,
                   SessionRecording.truncated)
            .where(SessionRecording.session_id == row.id).order_by(col(SessionRecording.id))
        )).all()
        units = (await session.exec(select(Unit.device).where(Unit.site_id == row.site_id)
                                    .order_by(col(Unit.device)))).all()
    return render(request, "session.html", {
        "user": user, "s": row, "site": site, "engineer": engineer.name if engineer else "?",
        "audit": audit, "chain": chain, "recordings": recordings, "units": units,
    })


async def _decide(request: Request, user: User, session_id: str, action: str,
                  note: str = "") -> RedirectResponse:
    ops = ops_of(request)
    now = request.app.state.clock()
    async with request.app.state.db.session() as session:
        await service.visible_session(session, user, session_id[:16])
        if action == "approve":
            await ops.approve(session, session_id, user, now=now)
        elif action == "deny":
            await ops.deny(session, session_id, user, now=now, note=note)
        elif action == "revoke":
            await ops.revoke(session, session_id, user, now=now, note=note)
        else:
            await ops.close(session, session_id, user, now=now)
    return RedirectResponse(f"/sessions/{session_id}", status_code=303)


@router.post("/sessions/{session_id}/approve", include_in_schema=False, dependencies=[Csrf])
async def approve(request: Request, user: WebUser, session_id: str) -> RedirectResponse:
    """The customer consents: the agent is told to dial the gateway."""
    return await _decide(request, user, session_id, "approve")


@router.post("/sessions/{session_id}/deny", include_in_schema=False, dependencies=[Csrf])
async def deny(request: Request, user: WebUser, session_id: str,
               note: Annotated[str, Form(max_length=2000)] = "") -> RedirectResponse:
    """The customer refuses."""
    return await _decide(request, user, session_id, "deny", note)


@router.post("/sessions/{session_id}/revoke", include_in_schema=False, dependencies=[Csrf])
async def revoke(request: Request, user: WebUser, session_id: str,
                 note: Annotated[str, Form(max_length=2000)] = "") -> RedirectResponse:
    """Withdraw access now (customer, requesting engineer, admin)."""
    return await _decide(request, user, session_id, "revoke", note)


@router.post("/sessions/{session_id}/close", include_in_schema=False, dependencies=[Csrf])
async def close(request: Request, user: WebUser, session_id: str) -> RedirectResponse:
    """The engineer is done."""
    return await _decide(request, user, session_id, "close")


def replay_of(cast: str) -> tuple[str, list[tuple[float, str]]]:
    """An asciicast v2's output as plain text, and its (time, text) output events."""
    events: list[tuple[float, str]] = []
    for line in cast.splitlines()[1:]:
        try:
            ts, kind, data = json.loads(line)
        except (ValueError, TypeError):
            continue
        if kind == "o" and isinstance(data, str) and isinstance(ts, int | float):
            events.append((float(ts), _ANSI.sub("", data)))
    return "".join(text for _, text in events).replace("\r\n", "\n"), events


@router.get("/sessions/{session_id}/recordings/{recording_id}", response_class=HTMLResponse,
            include_in_schema=False)
async def recording_page(request: Request, user: WebUser, session_id: str,
                         recording_id: int) -> HTMLResponse:
    """A shell recording as text, with a timed replay (asciicast v2 output events)."""
    async with request.app.state.db.session() as session:
        row = await service.visible_session(session, user, session_id[:16])
        rec = (await session.exec(select(SessionRecording).where(
            SessionRecording.id == recording_id, SessionRecording.session_id == row.id))).first()
    if rec is None:
        raise NotFound(f"recording {recording_id} not found")
    text, events = replay_of(rec.cast)
    return render(request, "recording.html", {
        "user": user, "s": row, "rec": rec, "text": text,
        "events_json": json.dumps(events).replace("</", "<\\/"),
    })
