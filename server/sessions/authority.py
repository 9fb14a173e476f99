"""The gateway's view of sessions, read from and written to the database.

Each call is its own short transaction, so the gateway never holds a database session while
bytes flow. A session whose ticket was closed is closed on the next look.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlmodel import select

from protocols.clock import Clock
from protocols.sessions import Scope, SessionState
from server.core.db import Database
from server.models import Site
from server.sessions import service
from server.sessions.errors import SessionStateError
from server.sessions.gateway import Recording, SessionView
from server.sessions.models import AgentSshKey, RemoteSession, SessionRecording, SshKey
from server.tickets import states as ticket_states
from server.tickets.models import Ticket


class DbAuthority:
    """`SessionAuthority` over the server's database."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def view(self, session: str) -> SessionView | None:
        """The session as the gateway needs it (None if unknown)."""
        async with self.db.session() as s:
            row = await s.get(RemoteSession, session)
            if row is None:
                return None
            ticket = await s.get(Ticket, row.ticket_id)
            if (ticket is not None and ticket.state == ticket_states.CLOSED
                    and row.state in ("requested", "approved", "active")):
                row = await service.close(s, session, actor="system", now=self.clock.now(),
                                          reason="the ticket was closed")
            site = await s.get(Site, row.site_id)
            eng = (await s.exec(select(SshKey.public_key)
                                .where(SshKey.user_id == row.engineer_id))).all()
            agents = (await s.exec(select(AgentSshKey.public_key)
                                   .where(AgentSshKey.site_id == row.site_id))).all()
            return SessionView(
                session=row.id, site=site.code if site is not None else "?",
                state=SessionState(row.state), scope=Scope.model_validate(row.scope),
                engineer_keys=frozenset(eng), agent_keys=frozenset(agents),
                claim_by=row.claim_by or row.requested_at, ends_at=row.ends_at,
                max_duration_s=row.max_duration_s)

    async def activate(self, session: str, peer: str) -> SessionView | None:
        """First engineer connection: approved -> active."""
        try:
            async with self.db.session() as s:
                await service.activate(s, session, peer=peer, now=self.clock.now())
        except SessionStateError:
            pass
        return await self.view(session)

    async def expire(self, session: str, reason: str) -> None:
        """Time ran out."""
        async with self.db.session() as s:
            await service.expire(s, session, reason, now=self.clock.now())

    async def audit(self, session: str, kind: str, detail: dict[str, Any]) -> None:
        """An audit entry by the gateway."""
        async with self.db.session() as s:
            await service.get_session(s, session, lock=True)
            await service.append_audit(s, session, kind, actor="gateway", detail=detail,
                                       now=self.clock.now())

    async def channel_closed(self, session: str, target: str, up: int, down: int) -> None:
        """Bytes per target."""
        async with self.db.session() as s:
            await service.add_forwarded(s, session, target, up, down, now=self.clock.now())

    async def store_recording(self, session: str, recording: Recording) -> None:
        """Keep the asciicast and note it (with its hash) in the audit chain."""
        text = recording.text()
        digest = hashlib.sha256(text.encode()).hexdigest()
        async with self.db.session() as s:
            await service.get_session(s, session, lock=True)
            s.add(SessionRecording(session_id=session, name=recording.name,
                                   started_at=recording.started, ended_at=self.clock.now(),
                                   sha256=digest, truncated=recording.truncated, cast=text))
            await service.append_audit(s, session, "recording.stored", actor="gateway",
                                       detail={"name": recording.name, "sha256": digest,
                                               "bytes": recording.size,
                                               "truncated": recording.truncated},
                                       now=self.clock.now())

    async def sweep(self) -> None:
        """Expire what ran out of time; close sessions of closed tickets."""
        now = self.clock.now()
        async with self.db.session() as s:
            await service.expire_due(s, now=now)
            await service.close_for_closed_tickets(s, now=now)
