"""`/api/v1/events`: what agents reported (alarm edges, comm loss, jobs), newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from server.api.deps import CurrentUser, IdPath, IdQuery, PageDep, SessionDep, get_visible, paginate
from server.core.security import visible_sites
from server.errors import InvalidInput
from server.models import Event
from server.schemas import EventPublic, Page, UTCTime

router = APIRouter(prefix="/events", tags=["events"])

EventKindQuery = Annotated[
    str | None, Query(min_length=1, max_length=32, pattern=r"^[a-z0-9_.]+$")
]


@router.get("", response_model=Page[EventPublic])
async def list_events(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    site_id: IdQuery = None,
    unit_id: IdQuery = None,
    kind: EventKindQuery = None,
    since: Annotated[UTCTime | None, Query(description="at or after (ISO-8601)")] = None,
    until: Annotated[UTCTime | None, Query(description="before (ISO-8601)")] = None,
) -> Page[Event]:
    """Events of the sites the caller may see."""
    if since is not None and until is not None and since >= until:
        raise InvalidInput("since must be before until")
    stmt = select(Event).where(visible_sites(user, col(Event.site_id)))
    if site_id is not None:
        stmt = stmt.where(Event.site_id == site_id)
    if unit_id is not None:
        stmt = stmt.where(Event.unit_id == unit_id)
    if kind is not None:
        stmt = stmt.where(Event.kind == kind)
    if since is not None:
        stmt = stmt.where(col(Event.ts) >= since)
    if until is not None:
        stmt = stmt.where(col(Event.ts) < until)
    rows, total = await paginate(session, stmt, page, col(Event.ts).desc(), col(Event.id).desc())
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{event_id}", response_model=EventPublic)
async def get_event(session: SessionDep, user: CurrentUser, event_id: IdPath) -> Event:
    """One event (404 if not the caller's to see)."""
    return await get_visible(session, user, Event, event_id, col(Event.site_id))
