"""Lifecycle steps that also reach the agent: the service's transitions plus the link's orders.

The API and the command-ack handler call these; each decides in the caller's transaction,
and the link sends its order only once that transaction commits.
"""

from __future__ import annotations

from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.sessions import Scope, SessionState
from server.models import Site, User
from server.sessions import service
from server.sessions.errors import NotYourSession
from server.sessions.link import AgentLink, NoLink
from server.sessions.models import RemoteSession
from server.sessions.service import Windows


class SessionOps:
    """Lifecycle with agent orders; one per process (`app.state.sessions`)."""

    def __init__(self, link: AgentLink | None = None, windows: Windows | None = None) -> None:
        self.link: AgentLink = link or NoLink()
        self.windows = windows or Windows()

    async def _site_code(self, s: AsyncSession, row: RemoteSession) -> str:
        site = await s.get(Site, row.site_id)
        return site.code if site is not None else "?"

    async def _open(self, s: AsyncSession, row: RemoteSession, *, approved: bool) -> None:
        grant = service.grant_of(row, approved=approved)
        info = {"reason": row.reason, "ticket": row.ticket_id}
        site = await self._site_code(s, row)
        command_id = await self.link.open(s, site, grant, info)
        if command_id is not None:
            row.command_id = command_id
            s.add(row)

    async def _close(self, s: AsyncSession, row: RemoteSession, reason: str) -> None:
        await self.link.close(s, await self._site_code(s, row), row.id, reason)

    async def request(self, s: AsyncSession, engineer: User, *, ticket_id: int, reason: str,
                      scope: Scope, max_duration_s: int, now: Any) -> RemoteSession:
        """Request; with the on-site policy the agent learns of it at once (not yet approved)."""
        row = await service.request_session(s, engineer, ticket_id=ticket_id, reason=reason,
                                            scope=scope, max_duration_s=max_duration_s,
                                            now=now, windows=self.windows)
        if row.approval == "onsite":
            await self._open(s, row, approved=False)
        return row

    async def approve(self, s: AsyncSession, session_id: str, user: User, *,
                      now: Any) -> RemoteSession:
        """Customer approval: the agent is told to dial the gateway."""
        row = await service.approve(s, session_id, user, now=now, windows=self.windows)
        await self._open(s, row, approved=True)
        return row

    async def deny(self, s: AsyncSession, session_id: str, user: User, *, now: Any,
                   note: str = "") -> RemoteSession:
        """Customer refusal (an on-site request is withdrawn from the agent)."""
        row = await service.deny(s, session_id, user, now=now, note=note)
        return row

    async def revoke(self, s: AsyncSession, session_id: str, user: User, *, now: Any,
                     note: str = "") -> RemoteSession:
        """Withdraw: the gateway cuts connections; the agent is told to close too."""
        before = (await service.get_session(s, session_id)).state
        row = await service.revoke(s, session_id, user, now=now, note=note)
        if before != SessionState.REQUESTED.value or row.approval == "onsite":
            await self._close(s, row, "revoked")
        return row

    async def close(self, s: AsyncSession, session_id: str, user: User, *,
                    now: Any) -> RemoteSession:
        """The engineer is done."""
        row = await service.visible_session(s, user, session_id)
        if user.role == "engineer" and user.id != row.engineer_id:
            raise NotYourSession("only the requesting engineer closes the session")
        row = await service.close(s, session_id, actor=service.actor_of(user), now=now,
                                  reason="closed by the engineer")
        await self._close(s, row, "closed")
        return row
