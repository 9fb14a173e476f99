"""`/api/v1/commands`: the orders sent to agents and their outcome (staff only).

Features send commands through their own resources (sessions, rollouts, commissioning); this
read-only view is for following one up ("did the agent get it, what did it say").
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter
from pydantic import BaseModel
from sqlmodel import col, select

from protocols.messages import CommandKind
from server.api.deps import PageDep, SessionDep, StaffUser, paginate
from server.commands.models import CommandRecord
from server.errors import NotFound
from server.models import Site
from server.schemas import Page, SiteCode

router = APIRouter(prefix="/commands", tags=["commands"])
CommandState = Literal["pending", "sent", "progress", "ok", "error", "rejected", "expired"]


class CommandPublic(BaseModel):
    """A command as the API shows it (without its signed payload)."""

    id: str
    site_id: int
    kind: str
    args: dict[str, Any]
    state: str
    issued_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    sends: int
    acked_at: datetime | None
    progress: dict[str, Any]
    result: dict[str, Any]


@router.get("", response_model=Page[CommandPublic])
async def list_commands(session: SessionDep, _user: StaffUser, page: PageDep,
                        site: SiteCode | None = None, kind: CommandKind | None = None,
                        state: CommandState | None = None) -> Page[CommandRecord]:
    """Commands, newest first, filtered by site code, kind and state."""
    stmt = select(CommandRecord)
    if site is not None:
        stmt = stmt.join(Site, col(Site.id) == col(CommandRecord.site_id)).where(Site.code == site)
    if kind is not None:
        stmt = stmt.where(CommandRecord.kind == kind.value)
    if state is not None:
        stmt = stmt.where(CommandRecord.state == state)
    rows, total = await paginate(session, stmt, page, col(CommandRecord.issued_at).desc())
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{command_id}", response_model=CommandPublic)
async def get_command(session: SessionDep, _user: StaffUser, command_id: UUID) -> CommandRecord:
    """One command and what the agent answered."""
    row = await session.get(CommandRecord, str(command_id))
    if row is None:
        raise NotFound(f"no command {command_id}")
    return row
