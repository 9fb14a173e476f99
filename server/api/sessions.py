"""`/api/v1/sessions`: consent-gated remote sessions; `/api/v1/users/me/ssh-keys`: gateway keys.

Engineers request sessions for tickets; a customer of the site's organisation approves or
denies them; the customer, the requesting engineer or an admin revokes them. Both the engineer
and that customer read the audit chain (verified on every read) and the shell recordings.
A customer of another organisation gets 404 for everything here.
"""

from __future__ import annotations

import shlex
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select

from protocols.sessions import UNIT_PORT, Scope
from server.api.deps import (
    CurrentUser,
    IdPath,
    IdQuery,
    NowDep,
    PageDep,
    SessionDep,
    StaffUser,
    id_of,
    paginate,
)
from server.core.security import visible_sites
from server.errors import NotFound
from server.schemas import Page, Plain
from server.sessions import diagnostics, keys, service
from server.sessions.models import RemoteSession, SessionRecording
from server.sessions.ops import SessionOps

router = APIRouter(tags=["sessions"])
SessionId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
                                description="session id (s + 12 hex digits)")]
"""Any well-formed word: an id that is no session's is "not found" (404), like every id."""
State = Literal["requested", "approved", "denied", "active", "closed", "expired", "revoked"]


class SessionCreate(BaseModel):
    """An engineer's request."""

    model_config = ConfigDict(extra="forbid")

    ticket_id: int = Field(ge=1)
    reason: Plain = Field(min_length=1, max_length=2000)
    scope: Scope
    max_duration_s: int = Field(default=3600, ge=60, le=service.MAX_DURATION_S)


class Note(BaseModel):
    """An optional note with a decision."""

    model_config = ConfigDict(extra="forbid")

    note: Plain = Field(default="", max_length=500)


class SessionPublic(BaseModel):
    """A session as the API shows it."""

    id: str
    ticket_id: int
    site_id: int
    engineer_id: int
    reason: str
    scope: dict[str, Any]
    max_duration_s: int
    approval: str
    state: str
    requested_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    claim_by: datetime | None
    first_connected_at: datetime | None
    ends_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    forwarded: dict[str, Any]


class AuditEntry(BaseModel):
    """One entry of the hash chain."""

    seq: int
    ts: datetime
    kind: str
    actor: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditLog(BaseModel):
    """The chain and the result of verifying it now."""

    session: str
    verified: bool
    entries: list[AuditEntry]
    first_bad: int | None
    reason: str


class RecordingInfo(BaseModel):
    """A stored shell recording (fetch the asciicast by its id)."""

    id: int
    name: str
    started_at: datetime
    ended_at: datetime
    sha256: str
    truncated: bool


class KeyCreate(BaseModel):
    """A public key for the gateway (one OpenSSH line)."""

    model_config = ConfigDict(extra="forbid")

    public_key: Plain = Field(min_length=16, max_length=2000)
    name: Plain = Field(default="key", min_length=1, max_length=100)


class KeyPublic(BaseModel):
    """A registered key."""

    id: int
    name: str
    public_key: str
    fingerprint: str
    created_at: datetime


class ConnectInfo(BaseModel):
    """The stock OpenSSH commands for a session."""

    session: str
    shell: str | None
    units: dict[str, str]
    known_hosts: str | None


def ops_of(request: Request) -> SessionOps:
    """The process's session operations (set by create_app)."""
    ops: SessionOps = request.app.state.sessions
    return ops


@router.post("/sessions", response_model=SessionPublic, status_code=201)
async def request_session(request: Request, s: SessionDep, user: StaffUser, now: NowDep,
                          body: SessionCreate) -> RemoteSession:
    """Ask for a remote session for a ticket (engineer); the customer must approve."""
    row = await ops_of(request).request(s, user, ticket_id=body.ticket_id, reason=body.reason,
                                        scope=body.scope, max_duration_s=body.max_duration_s,
                                        now=now)
    await s.commit()
    return row


@router.get("/sessions", response_model=Page[SessionPublic])
async def list_sessions(s: SessionDep, user: CurrentUser, page: PageDep,
                        state: Annotated[State | None, Query()] = None,
                        ticket_id: IdQuery = None, site_id: IdQuery = None) -> Page[RemoteSession]:
    """Sessions the caller may see, newest first."""
    stmt = select(RemoteSession).where(visible_sites(user, col(RemoteSession.site_id)))
    if state is not None:
        stmt = stmt.where(RemoteSession.state == state)
    if ticket_id is not None:
        stmt = stmt.where(RemoteSession.ticket_id == ticket_id)
    if site_id is not None:
        stmt = stmt.where(RemoteSession.site_id == site_id)
    rows, total = await paginate(s, stmt, page, col(RemoteSession.requested_at).desc())
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/sessions/{session_id}", response_model=SessionPublic)
async def get_session(s: SessionDep, user: CurrentUser, session_id: SessionId) -> RemoteSession:
    """One session."""
    return await service.visible_session(s, user, session_id)


@router.post("/sessions/{session_id}/approve", response_model=SessionPublic)
async def approve(request: Request, s: SessionDep, user: CurrentUser, now: NowDep,
                  session_id: SessionId) -> RemoteSession:
    """Consent (a customer of the site's organisation); the agent then opens the tunnel."""
    row = await ops_of(request).approve(s, session_id, user, now=now)
    await s.commit()
    return row


@router.post("/sessions/{session_id}/deny", response_model=SessionPublic)
async def deny(request: Request, s: SessionDep, user: CurrentUser, now: NowDep,
               session_id: SessionId, body: Note) -> RemoteSession:
    """Refuse consent (a customer of the site's organisation); `{}` or `{"note": ...}`."""
    row = await ops_of(request).deny(s, session_id, user, now=now, note=body.note)
    await s.commit()
    return row


@router.post("/sessions/{session_id}/revoke", response_model=SessionPublic)
async def revoke(request: Request, s: SessionDep, user: CurrentUser, now: NowDep,
                 session_id: SessionId, body: Note) -> RemoteSession:
    """Withdraw access now; live connections are cut within seconds; `{}` or `{"note": ...}`."""
    row = await ops_of(request).revoke(s, session_id, user, now=now, note=body.note)
    await s.commit()
    return row


@router.post("/sessions/{session_id}/close", response_model=SessionPublic)
async def close(request: Request, s: SessionDep, user: StaffUser, now: NowDep,
                session_id: SessionId) -> RemoteSession:
    """The engineer is done."""
    row = await ops_of(request).close(s, session_id, user, now=now)
    await s.commit()
    return row


@router.get("/sessions/{session_id}/audit", response_model=AuditLog)
async def audit(s: SessionDep, user: CurrentUser, session_id: SessionId) -> AuditLog:
    """The session's hash-chained audit log, verified now."""
    await service.visible_session(s, user, session_id)
    rows = await service.audit_entries(s, session_id)
    check = await service.verify_audit(s, session_id)
    return AuditLog(session=session_id, verified=check.ok, first_bad=check.first_bad,
                    reason=check.reason,
                    entries=[AuditEntry.model_validate(r, from_attributes=True) for r in rows])


@router.get("/sessions/{session_id}/recordings", response_model=list[RecordingInfo])
async def recordings(s: SessionDep, user: CurrentUser,
                     session_id: SessionId) -> list[SessionRecording]:
    """The session's shell recordings."""
    await service.visible_session(s, user, session_id)
    rows = await s.exec(select(SessionRecording).where(SessionRecording.session_id == session_id)
                        .order_by(col(SessionRecording.id)))
    return list(rows.all())


@router.get("/sessions/{session_id}/recordings/{recording_id}",
            response_class=PlainTextResponse)
async def recording(s: SessionDep, user: CurrentUser, session_id: SessionId,
                    recording_id: IdPath) -> PlainTextResponse:
    """One recording as asciicast v2 (`asciinema play file.cast`)."""
    await service.visible_session(s, user, session_id)
    row = await s.get(SessionRecording, recording_id)
    if row is None or row.session_id != session_id:
        raise NotFound(f"recording {recording_id} not found")
    return PlainTextResponse(row.cast, media_type="application/x-asciicast")


@router.get("/sessions/{session_id}/connect", response_model=ConnectInfo)
async def connect(request: Request, s: SessionDep, user: StaffUser,
                  session_id: SessionId) -> ConnectInfo:
    """The `ssh` commands for this session (shell, and `-L` per unit in scope)."""
    row = await service.visible_session(s, user, session_id)
    settings = request.app.state.settings
    host = settings.gateway.public_host or settings.gateway.host
    port = settings.gateway.port
    scope = Scope.model_validate(row.scope)
    base = f"ssh -p {port}"
    target = f"{row.id}@{host}"
    units = {unit: f"{base} -N -L {15020 + i}:{shlex.quote(unit)}:{UNIT_PORT} {target}"
             for i, unit in enumerate(scope.units)}
    host_key = request.app.state.gateway_host_key
    if host_key is None:  # the gateway may have created its key after the app started
        from server.app import gateway_public_key

        host_key = request.app.state.gateway_host_key = gateway_public_key(settings)
    return ConnectInfo(session=row.id, shell=f"{base} {target}" if scope.shell else None,
                       units=units,
                       known_hosts=f"[{host}]:{port} {host_key}" if host_key else None)


@router.get("/users/me/ssh-keys", response_model=list[KeyPublic])
async def my_keys(s: SessionDep, user: CurrentUser) -> list[Any]:
    """Your public keys for the session gateway."""
    return list(await keys.list_keys(s, id_of(user)))


@router.post("/users/me/ssh-keys", response_model=KeyPublic, status_code=201)
async def add_key(s: SessionDep, user: StaffUser, body: KeyCreate) -> Any:
    """Register a public key (engineers): the gateway accepts it for your sessions."""
    row = await keys.add_key(s, id_of(user), body.public_key, body.name)
    await s.commit()
    return row


@router.delete("/users/me/ssh-keys/{key_id}", status_code=204)
async def delete_key(s: SessionDep, user: CurrentUser, key_id: IdPath) -> None:
    """Remove one of your keys."""
    await keys.delete_key(s, id_of(user), key_id)
    await s.commit()


class DiagnosticSent(BaseModel):
    """A diagnostic on its way to the agent; its result lands on the ticket's timeline."""

    session: str
    command_id: str | None


@router.post("/sessions/{session_id}/diagnostics", response_model=DiagnosticSent,
             status_code=202)
async def diagnostic(request: Request, s: SessionDep, user: StaffUser, now: NowDep,
                     session_id: SessionId, body: diagnostics.Action) -> DiagnosticSent:
    """Run a predefined action (registers, SunSpec scan, ping, agent log) in the session."""
    command_id = await diagnostics.request(s, ops_of(request).link, user, session_id, body,
                                           now=now)
    await s.commit()
    return DiagnosticSent(session=session_id, command_id=command_id)
