"""Diagnostics without a shell: predefined actions run by the agent within an approved session.

    read_registers {unit, address, count<=125}   holding registers of a unit in scope
    sunspec_scan   {unit}                        the unit's SunSpec model chain
    ping           {unit}                        can the agent reach the unit, how fast
    agent_log      {lines<=500}                  the agent's recent log, secrets redacted

The request is audited and written on the ticket; the agent's answer (a `diagnostic` ack) is
attached to the ticket's timeline, so diagnosis and proposed solution rest on evidence.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.sessions import LIVE, DeviceName, Scope, SessionState
from server.models import Site, User
from server.sessions import service
from server.sessions.errors import NotYourSession, SessionInputError, SessionStateError
from server.tickets import service as tickets


class ReadRegisters(BaseModel):
    """Holding registers of a unit."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["read_registers"]
    unit: DeviceName
    address: int = Field(ge=0, le=65535)
    count: int = Field(default=10, ge=1, le=125)


class SunSpecScan(BaseModel):
    """The SunSpec model chain of a unit."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["sunspec_scan"]
    unit: DeviceName


class Ping(BaseModel):
    """Reachability of a unit from the agent."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["ping"]
    unit: DeviceName


class AgentLog(BaseModel):
    """The agent's recent log, secrets redacted."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["agent_log"]
    lines: int = Field(default=100, ge=1, le=500)


Action = Annotated[ReadRegisters | SunSpecScan | Ping | AgentLog, Field(discriminator="action")]


async def request(s: AsyncSession, link: Any, user: User, session_id: str, action: Action, *,
                  now: datetime) -> str | None:
    """Check the action against the session and send it to the agent; the command id."""
    row = await service.visible_session(s, user, session_id)
    if user.id != row.engineer_id and user.role != "admin":
        raise NotYourSession("only the requesting engineer runs diagnostics")
    if SessionState(row.state) not in LIVE:
        raise SessionStateError(f"session {session_id} is {row.state}; diagnostics need an "
                                "approved session")
    unit = getattr(action, "unit", None)
    if unit is not None and unit not in Scope.model_validate(row.scope).units:
        raise SessionInputError(f"unit {unit} is outside this session's scope")
    site = await s.get(Site, row.site_id)
    args = action.model_dump(mode="json")
    await service.get_session(s, session_id, lock=True)
    await service.append_audit(s, session_id, "diagnostic.requested",
                               actor=service.actor_of(user), detail=args, now=now)
    await tickets.record(s, row.ticket_id, "diagnostic_requested",
                         f"diagnostic {args['action']} in session {session_id}",
                         actor=service.actor_of(user), detail={"session": session_id, **args},
                         now=now)
    result: str | None = await link.diagnostic(s, site.code if site else "?", session_id, args)
    return result


async def attach_result(s: AsyncSession, session_id: str, command_id: str,
                        args: dict[str, Any], outcome: str, detail: dict[str, Any], *,
                        now: datetime) -> None:
    """Put the agent's answer on the ticket's timeline and in the audit chain."""
    row = await service.get_session(s, session_id, lock=True)
    await service.append_audit(s, session_id, "diagnostic.result", actor="agent",
                               detail={"command": command_id, "outcome": outcome,
                                       "action": args.get("action")}, now=now)
    await tickets.record(s, row.ticket_id, "diagnostic_result",
                         f"diagnostic {args.get('action')} ({outcome}) in session {session_id}",
                         actor="agent", detail={"session": session_id, "command": command_id,
                                                "request": args, "outcome": outcome,
                                                "result": detail}, now=now)
