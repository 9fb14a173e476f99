"""`/api/v1/agents`: site gateways' agents, read-only here (enrolment lives with ingest)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import col, select

from server.api.deps import CurrentUser, IdPath, IdQuery, PageDep, SessionDep, get_visible, paginate
from server.core.security import visible_sites
from server.models import Agent
from server.schemas import AgentPublic, Page

router = APIRouter(prefix="/agents", tags=["agents"])


@router.get("", response_model=Page[AgentPublic])
async def list_agents(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    site_id: IdQuery = None,
    online: bool | None = None,
) -> Page[Agent]:
    """Agents of the sites the caller may see."""
    stmt = select(Agent).where(visible_sites(user, col(Agent.site_id)))
    if site_id is not None:
        stmt = stmt.where(Agent.site_id == site_id)
    if online is not None:
        stmt = stmt.where(Agent.online == online)
    rows, total = await paginate(session, stmt, page, col(Agent.id))
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{agent_id}", response_model=AgentPublic)
async def get_agent(session: SessionDep, user: CurrentUser, agent_id: IdPath) -> Agent:
    """One agent by its numeric id (404 if not the caller's to see)."""
    return await get_visible(session, user, Agent, agent_id, col(Agent.site_id))
