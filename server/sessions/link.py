"""How the server tells a site's agent to open or close a session (or run a diagnostic).

`AgentLink` is the seam: in production `CommandLink` sends signed `session.open`,
`session.close` and `diagnostic` commands through the command channel; tests may plug in a
link that calls an in-process agent directly. Either way the order leaves only after the
transaction that decided it has committed (`after_commit`), so the agent never dials for a
session the gateway cannot see yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from sqlalchemy import event
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock
from protocols.messages import AckResult, CommandAck, CommandKind
from protocols.sessions import Grant
from server.commands.models import CommandRecord
from server.commands.service import CommandService
from server.sessions import diagnostics, service

log = logging.getLogger(__name__)

_pending: set[asyncio.Task[Any]] = set()


def after_commit(s: AsyncSession, action: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run `action()` in a task once `s` commits (never if it rolls back)."""

    def run(_session: Any) -> None:
        task = asyncio.get_running_loop().create_task(action())
        _pending.add(task)
        task.add_done_callback(_finished)

    event.listen(s.sync_session, "after_commit", run, once=True)


def _finished(task: asyncio.Task[Any]) -> None:
    _pending.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("sessions: telling the agent failed: %s", exc, exc_info=exc)


class AgentLink(Protocol):
    """Orders to a site's agent about sessions."""

    async def open(self, s: AsyncSession, site: str, grant: Grant,
                   info: dict[str, Any]) -> str | None:
        """Send `session.open`; returns the command id if there is one."""

    async def close(self, s: AsyncSession, site: str, session: str, reason: str) -> None:
        """Send `session.close`."""

    async def diagnostic(self, s: AsyncSession, site: str, session: str,
                         action: dict[str, Any]) -> str | None:
        """Send a `diagnostic` command; its result comes back as an ack."""


class NoLink:
    """No way to reach agents (the API runs without a command channel): orders are logged."""

    async def open(self, s: AsyncSession, site: str, grant: Grant,
                   info: dict[str, Any]) -> str | None:
        """Log only."""
        log.warning("sessions: no command channel; agent of %s not told to open %s", site,
                    grant.session)
        return None

    async def close(self, s: AsyncSession, site: str, session: str, reason: str) -> None:
        """Log only."""
        log.warning("sessions: no command channel; agent of %s not told to close %s", site,
                    session)

    async def diagnostic(self, s: AsyncSession, site: str, session: str,
                         action: dict[str, Any]) -> str | None:
        """Log only."""
        log.warning("sessions: no command channel; diagnostic for %s not sent", session)
        return None


class CommandLink:
    """The production link: signed commands on `emu/v1/{site}/cmd` (server/commands)."""

    def __init__(self, commands: CommandService) -> None:
        self.commands = commands

    async def open(self, s: AsyncSession, site: str, grant: Grant,
                   info: dict[str, Any]) -> str | None:
        """`session.open`, valid until the claim-by deadline."""
        ttl = max(1.0, (grant.claim_by - self.commands.clock.now()).total_seconds())
        cmd = await self.commands.send(s, site, CommandKind.SESSION_OPEN,
                                       {"grant": grant.model_dump(mode="json"), "info": info},
                                       ttl_s=ttl)
        return str(cmd.id)

    async def close(self, s: AsyncSession, site: str, session: str, reason: str) -> None:
        """`session.close`."""
        await self.commands.send(s, site, CommandKind.SESSION_CLOSE,
                                 {"session": session, "reason": reason})

    async def diagnostic(self, s: AsyncSession, site: str, session: str,
                         action: dict[str, Any]) -> str | None:
        """`diagnostic` within the session."""
        cmd = await self.commands.send(s, site, CommandKind.DIAGNOSTIC,
                                       {"session": session, **action})
        return str(cmd.id)


def attach_acks(commands: CommandService, clock: Clock) -> None:
    """Follow the agents' answers: on-site approvals, tunnel state, diagnostic results."""

    async def on_open(s: AsyncSession, row: CommandRecord, ack: CommandAck) -> None:
        args = row.args or {}
        session_id = str((args.get("grant") or {}).get("session", ""))
        if not session_id:
            return
        detail = dict(ack.detail)
        now = clock.now()
        if ack.result is AckResult.PROGRESS and detail.get("state") == "approved":
            await service.approve_onsite(s, session_id, str(detail.get("technician", "?")),
                                         now=now)
            return
        await service.get_session(s, session_id, lock=True)
        kind = f"agent.{detail.get('state', ack.result.value)}"
        await service.append_audit(s, session_id, kind, actor="agent", detail=detail, now=now)

    async def on_diagnostic(s: AsyncSession, row: CommandRecord, ack: CommandAck) -> None:
        if ack.result is AckResult.PROGRESS:
            return
        session_id = str((row.args or {}).get("session", ""))
        if not session_id:
            return  # a diagnostic sent outside a session (e.g. by staff directly)
        await diagnostics.attach_result(s, session_id, row.id, dict(row.args or {}),
                                        ack.result.value, dict(ack.detail), now=clock.now())

    commands.on_ack(CommandKind.SESSION_OPEN, on_open)
    commands.on_ack(CommandKind.DIAGNOSTIC, on_diagnostic)
