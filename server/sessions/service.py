"""The lifecycle of a remote session, in the database (async, never commits itself).

    request (engineer, for a ticket)    -> requested   ticket clocks pause ("consent")
    approve (customer of the site's org, or the on-site technician through the agent)
                                         -> approved    clocks resume; claim-by deadline set
    deny                                 -> denied      clocks resume
    first engineer connection (gateway)  -> active      maximum duration starts
    close (engineer) / ticket closed     -> closed
    claim-by or maximum duration passed  -> expired
    revoke (customer, engineer, admin)   -> revoked     the gateway cuts connections

Every transition is appended to the session's hash-chained audit log and to the ticket's
timeline. Who may do what is checked here, so the API and the CLI cannot differ.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.sessions import (
    GENESIS,
    ChainCheck,
    Grant,
    Scope,
    SessionState,
    can_move,
    chain_hash,
    verify_chain,
)
from server.core.security import STAFF, Role
from server.models import Site, Unit, User
from server.sessions.errors import (
    NotYourSession,
    SessionInputError,
    SessionNotFound,
    SessionStateError,
)
from server.sessions.models import RemoteSession, SessionAudit
from server.tickets import service as tickets
from server.tickets import states as ticket_states
from server.tickets.models import Ticket

CONSENT = "consent"
MAX_DURATION_S = 8 * 3600


@dataclass(frozen=True)
class Windows:
    """How long an approval may wait for the engineer (from the settings)."""

    claim_s: float = 1800.0
    """Customer approval: the engineer must connect within this long after it."""
    onsite_s: float = 4 * 3600.0
    """On-site approval: the request, the technician and the engineer all fit in this."""


def new_session_id() -> str:
    """A public, unguessable session id that is also a valid SSH user name."""
    return "s" + secrets.token_hex(6)


def actor_of(user: User) -> str:
    """How a user appears in timelines and audit entries."""
    return f"{user.role}:{user.name}"


def _pk(value: int | None) -> int:
    if value is None:  # pragma: no cover - rows read back always have their key
        raise RuntimeError("row has no id")
    return value


async def get_session(s: AsyncSession, session_id: str, *, lock: bool = False) -> RemoteSession:
    """The session row (SessionNotFound if none).

    `lock` serialises writers of one session (its transitions and its audit chain): a row
    lock on PostgreSQL; on SQLite a no-op UPDATE, which takes the database's write lock first
    thing, so two appends cannot read the same chain head.
    """
    stmt = select(RemoteSession).where(RemoteSession.id == session_id)
    if lock:
        stmt = stmt.with_for_update()
        if s.get_bind().dialect.name == "sqlite":
            await s.exec(sa.update(RemoteSession).where(col(RemoteSession.id) == session_id)
                         .values(id=RemoteSession.id))
    row = (await s.exec(stmt)).first()
    if row is None:
        raise SessionNotFound(f"session {session_id} not found")
    return row


async def visible_session(s: AsyncSession, user: User, session_id: str) -> RemoteSession:
    """The session if `user` may see it: staff see all, a customer its organisation's sites."""
    row = (await s.exec(select(RemoteSession).where(RemoteSession.id == session_id))).first()
    if row is None or not await may_see(s, user, row):
        raise SessionNotFound(f"session {session_id} not found")
    return row


async def may_see(s: AsyncSession, user: User, row: RemoteSession) -> bool:
    """Staff, or a customer of the site's organisation."""
    if user.role in STAFF:
        return True
    site = await s.get(Site, row.site_id)
    return site is not None and user.org_id is not None and site.org_id == user.org_id


async def append_audit(s: AsyncSession, session_id: str, kind: str, *, actor: str | None,
                       detail: dict[str, Any] | None = None, now: datetime) -> SessionAudit:
    """Append an entry to the session's hash chain (the caller holds the session row lock)."""
    last = (await s.exec(
        select(SessionAudit).where(SessionAudit.session_id == session_id)
        .order_by(col(SessionAudit.seq).desc()).limit(1)
    )).first()
    seq = 1 if last is None else last.seq + 1
    prev = GENESIS if last is None else last.hash
    entry = SessionAudit(session_id=session_id, seq=seq, ts=now, kind=kind[:40],
                         actor=actor, detail=dict(detail or {}), prev_hash=prev, hash="")
    entry.hash = chain_hash(prev, audit_body(entry))
    s.add(entry)
    await s.flush()
    return entry


def audit_body(entry: SessionAudit) -> dict[str, Any]:
    """What an audit entry's hash covers (everything but its own hash and row id)."""
    return {"session": entry.session_id, "seq": entry.seq, "ts": entry.ts.isoformat(),
            "kind": entry.kind, "actor": entry.actor, "detail": entry.detail}


async def audit_entries(s: AsyncSession, session_id: str) -> list[SessionAudit]:
    """The session's audit log in order."""
    rows = await s.exec(select(SessionAudit).where(SessionAudit.session_id == session_id)
                        .order_by(col(SessionAudit.seq)))
    return list(rows.all())


async def verify_audit(s: AsyncSession, session_id: str) -> ChainCheck:
    """Recompute the chain of `session_id` from its genesis."""
    rows = await audit_entries(s, session_id)
    return verify_chain([(audit_body(r), r.prev_hash, r.hash) for r in rows])


async def _move(s: AsyncSession, row: RemoteSession, target: SessionState, *, actor: str | None,
                now: datetime, text: str = "", detail: dict[str, Any] | None = None) -> None:
    current = SessionState(row.state)
    if not can_move(current, target):
        raise SessionStateError(f"session {row.id} is {current.value}; it cannot become "
                                f"{target.value}")
    row.state = target.value
    if target in (SessionState.DENIED, SessionState.CLOSED, SessionState.EXPIRED,
                  SessionState.REVOKED):
        row.ended_at = now
        row.end_reason = (text or target.value)[:200]
    s.add(row)
    info = {"state": target.value, **(detail or {})}
    await append_audit(s, row.id, target.value, actor=actor, detail={"text": text, **info},
                       now=now)
    await tickets.record(s, row.ticket_id, f"session_{target.value}",
                         f"remote session {row.id} {target.value}" + (f": {text}" if text else ""),
                         actor=actor, detail={"session": row.id, **info}, now=now)
    if current is SessionState.REQUESTED:
        await tickets.resume_clocks(s, row.ticket_id, CONSENT, now=now)


async def request_session(s: AsyncSession, engineer: User, *, ticket_id: int, reason: str,
                          scope: Scope, max_duration_s: int, now: datetime,
                          windows: Windows = Windows()) -> RemoteSession:
    """An engineer asks for access for a ticket; the ticket's clocks wait for consent."""
    if engineer.role not in STAFF:
        raise NotYourSession("only the vendor's engineers request remote sessions")
    if scope.empty:
        raise SessionInputError("scope: ask for the shell and/or at least one unit")
    if not 60 <= max_duration_s <= MAX_DURATION_S:
        raise SessionInputError(f"max_duration_s must be between 60 and {MAX_DURATION_S}")
    if not reason.strip():
        raise SessionInputError("reason: say why the session is needed")
    ticket = await s.get(Ticket, ticket_id)
    if ticket is None:
        raise SessionInputError(f"ticket {ticket_id} does not exist")
    if ticket.state not in ticket_states.OPEN_STATES:
        raise SessionStateError(f"ticket {ticket_id} is {ticket.state}")
    site = await s.get(Site, ticket.site_id)
    if site is None:  # pragma: no cover - foreign key
        raise SessionInputError("the ticket's site does not exist")
    known = set((await s.exec(select(Unit.device).where(Unit.site_id == site.id))).all())
    unknown = sorted(set(scope.units) - known)
    if unknown:
        raise SessionInputError(f"scope.units: not units of site {site.code}: "
                                f"{', '.join(unknown)}")
    approval = str((site.policy or {}).get("approval", "customer"))
    if approval not in ("customer", "onsite"):
        approval = "customer"
    row = RemoteSession(
        id=new_session_id(), ticket_id=ticket_id, site_id=_pk(site.id),
        engineer_id=_pk(engineer.id), reason=reason.strip(), scope=scope.model_dump(mode="json"),
        max_duration_s=max_duration_s, approval=approval, state=SessionState.REQUESTED.value,
        requested_at=now,
        claim_by=now + timedelta(seconds=windows.onsite_s) if approval == "onsite" else None,
    )
    s.add(row)
    await s.flush()
    actor = actor_of(engineer)
    await append_audit(s, row.id, "requested", actor=actor, now=now, detail={
        "ticket": ticket_id, "reason": row.reason, "scope": row.scope,
        "max_duration_s": max_duration_s, "approval": approval})
    await tickets.link(s, ticket_id, "session", row.id, now=now, state="requested", actor=actor)
    await tickets.record(s, ticket_id, "session_requested",
                         f"remote session {row.id} requested: {row.reason}", actor=actor,
                         detail={"session": row.id, "scope": row.scope,
                                 "approval": approval}, now=now)
    await tickets.pause_clocks(s, ticket_id, CONSENT, now=now)
    return row


def grant_of(row: RemoteSession, *, approved: bool) -> Grant:
    """What the agent is sent (`session.open` args)."""
    if row.claim_by is None:
        raise SessionStateError(f"session {row.id} has no claim-by deadline yet")
    return Grant(session=row.id, scope=Scope.model_validate(row.scope), claim_by=row.claim_by,
                 max_duration_s=row.max_duration_s, approval=row.approval,
                 approved=approved)


async def approve(s: AsyncSession, session_id: str, user: User, *, now: datetime,
                  windows: Windows = Windows()) -> RemoteSession:
    """A customer of the site's organisation consents (the one way to approve over the API)."""
    row = await get_session(s, session_id, lock=True)
    if not await may_see(s, user, row):
        raise SessionNotFound(f"session {session_id} not found")
    if user.role != Role.CUSTOMER.value:
        raise NotYourSession("only a customer of the site's organisation can approve")
    if row.approval == "onsite":
        raise NotYourSession("this site's policy: the on-site technician approves at the "
                             "gateway (`emu agent approve`)")
    row.decided_at, row.decided_by = now, actor_of(user)
    row.claim_by = now + timedelta(seconds=windows.claim_s)
    await _move(s, row, SessionState.APPROVED, actor=actor_of(user), now=now,
                detail={"claim_by": row.claim_by.isoformat()})
    return row


async def approve_onsite(s: AsyncSession, session_id: str, technician: str, *,
                         now: datetime) -> RemoteSession:
    """The agent reports that the on-site technician approved at the gateway."""
    row = await get_session(s, session_id, lock=True)
    if row.approval != "onsite":
        raise NotYourSession(f"session {session_id} is for the customer to approve")
    actor = f"onsite:{technician}"[:100]
    row.decided_at, row.decided_by = now, actor
    await _move(s, row, SessionState.APPROVED, actor=actor, now=now,
                text="approved at the gateway")
    return row


async def deny(s: AsyncSession, session_id: str, user: User, *, now: datetime,
               note: str = "") -> RemoteSession:
    """The customer refuses consent."""
    row = await get_session(s, session_id, lock=True)
    if not await may_see(s, user, row):
        raise SessionNotFound(f"session {session_id} not found")
    if user.role != Role.CUSTOMER.value:
        raise NotYourSession("only a customer of the site's organisation can deny")
    row.decided_at, row.decided_by = now, actor_of(user)
    await _move(s, row, SessionState.DENIED, actor=actor_of(user), now=now, text=note)
    return row


async def revoke(s: AsyncSession, session_id: str, user: User, *, now: datetime,
                 note: str = "") -> RemoteSession:
    """Withdraw access now: the customer, the requesting engineer or an admin."""
    row = await get_session(s, session_id, lock=True)
    if not await may_see(s, user, row):
        raise SessionNotFound(f"session {session_id} not found")
    if user.role == Role.ENGINEER.value and user.id != row.engineer_id:
        raise NotYourSession("only the requesting engineer, the customer or an admin revokes")
    await _move(s, row, SessionState.REVOKED, actor=actor_of(user), now=now,
                text=note or "revoked")
    return row


async def close(s: AsyncSession, session_id: str, *, actor: str, now: datetime,
                reason: str = "closed") -> RemoteSession:
    """The engineer is done (or the ticket closed): end the session normally."""
    row = await get_session(s, session_id, lock=True)
    await _move(s, row, SessionState.CLOSED, actor=actor, now=now, text=reason)
    return row


async def activate(s: AsyncSession, session_id: str, *, peer: str,
                   now: datetime) -> RemoteSession:
    """The engineer's first connection: the session turns active and its duration starts."""
    row = await get_session(s, session_id, lock=True)
    if row.state == SessionState.APPROVED.value:
        row.first_connected_at = now
        row.ends_at = now + timedelta(seconds=row.max_duration_s)
        await _move(s, row, SessionState.ACTIVE, actor="gateway", now=now,
                    detail={"peer": peer, "ends_at": row.ends_at.isoformat()})
    await append_audit(s, row.id, "engineer.connected", actor="gateway",
                       detail={"peer": peer}, now=now)
    return row


async def expire(s: AsyncSession, session_id: str, reason: str, *,
                 now: datetime) -> RemoteSession | None:
    """Time ran out; None if the session had ended already."""
    row = await get_session(s, session_id, lock=True)
    if not can_move(SessionState(row.state), SessionState.EXPIRED):
        return None
    await _move(s, row, SessionState.EXPIRED, actor="gateway", now=now, text=reason)
    return row


async def expire_due(s: AsyncSession, *, now: datetime) -> list[str]:
    """Expire approvals past their claim-by and active sessions past their end (scheduler)."""
    due = (await s.exec(select(RemoteSession.id).where(
        sa.or_(
            sa.and_(col(RemoteSession.state).in_(("requested", "approved")),
                    col(RemoteSession.claim_by).is_not(None),
                    col(RemoteSession.claim_by) <= now),
            sa.and_(col(RemoteSession.state) == "active",
                    col(RemoteSession.ends_at) <= now),
        )))).all()
    done = []
    for session_id in due:
        if await expire(s, session_id, "time ran out", now=now) is not None:
            done.append(session_id)
    return done


async def close_for_closed_tickets(s: AsyncSession, *, now: datetime) -> list[str]:
    """End the sessions of tickets that were closed (scheduler and gateway)."""
    ids = (await s.exec(
        select(RemoteSession.id).join(Ticket, col(Ticket.id) == col(RemoteSession.ticket_id))
        .where(col(RemoteSession.state).in_(("requested", "approved", "active")))
        .where(col(Ticket.state) == ticket_states.CLOSED))).all()
    for session_id in ids:
        await close(s, session_id, actor="system", now=now, reason="the ticket was closed")
    return list(ids)


async def add_forwarded(s: AsyncSession, session_id: str, target: str, up: int, down: int, *,
                        now: datetime) -> None:
    """Count a finished channel's bytes on the session and in its audit log."""
    row = await get_session(s, session_id, lock=True)
    totals = dict(row.forwarded or {})
    before = totals.get(target) or {"up": 0, "down": 0, "channels": 0}
    totals[target] = {"up": before["up"] + up, "down": before["down"] + down,
                      "channels": before["channels"] + 1}
    row.forwarded = totals
    s.add(row)
    await append_audit(s, session_id, "channel.closed", actor="gateway",
                       detail={"target": target, "bytes_up": up, "bytes_down": down}, now=now)
