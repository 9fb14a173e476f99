"""`/api/v1/commissioning`: plans, their documents, remote runs, on-site results, reports.

Staff (admin, engineer: the after-sales lead and the technicians) write plans and results;
a customer sees its own organisation's plans (scoped like every site-owned object) and
acknowledges them. Documents and reports download as HTML or PDF (`format=`), reports also as
JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlmodel import col, select

from server.api.deps import (
    CurrentUser,
    IdPath,
    IdQuery,
    NowDep,
    PageDep,
    SessionDep,
    StaffUser,
    get_visible,
    id_of,
    paginate,
)
from server.commissioning import service
from server.commissioning.channel import send_check
from server.commissioning.errors import NoAgentChannel
from server.commissioning.models import (
    CommissioningDocument,
    CommissioningPlan,
    CommissioningRun,
    OnsiteResult,
)
from server.commissioning.schemas import (
    DocumentPublic,
    OnsiteBatch,
    OnsitePublic,
    PlanCreate,
    PlanPublic,
    PlanUpdate,
    RunPublic,
    State,
)
from server.core.security import Role, visible_sites
from server.errors import Forbidden
from server.models import Site, User
from server.schemas import MAX_ID, Page

router = APIRouter(prefix="/commissioning", tags=["commissioning"])

Format = Literal["html", "pdf", "json"]


async def visible_plan(session: SessionDep, user: CurrentUser, plan_id: IdPath
                       ) -> CommissioningPlan:
    """The plan in the path if the caller may see it (404 otherwise, before any body is
    validated); staff routes declare their role check first, so customers get 403."""
    return await get_visible(session, user, CommissioningPlan, plan_id,
                             col(CommissioningPlan.site_id))


PlanDep = Annotated[CommissioningPlan, Depends(visible_plan)]


def _download(doc_html: str, pdf: bytes, title: str, fmt: str) -> Response:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in title)[:100]
    if fmt == "pdf":
        return Response(pdf, media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="{name}.pdf"'})
    return Response(doc_html, media_type="text/html; charset=utf-8")


@router.get("/plans", response_model=Page[PlanPublic])
async def list_plans(
    session: SessionDep, user: CurrentUser, page: PageDep, site_id: IdQuery = None,
    state: State | None = None,
) -> Page[CommissioningPlan]:
    """Plans of the sites the caller may see, newest first."""
    stmt = select(CommissioningPlan).where(visible_sites(user, col(CommissioningPlan.site_id)))
    if site_id is not None:
        stmt = stmt.where(CommissioningPlan.site_id == site_id)
    if state is not None:
        stmt = stmt.where(CommissioningPlan.state == state)
    rows, total = await paginate(session, stmt, page, col(CommissioningPlan.id).desc())
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.post("/plans", response_model=PlanPublic, status_code=201)
async def create_plan(session: SessionDep, user: StaffUser, now: NowDep, body: PlanCreate
                      ) -> CommissioningPlan:
    """A draft plan; its checklist comes from the series' profiles unless given."""
    fields = body.fields()
    site_id = fields.pop("site_id")
    plan = await service.create_plan(session, site_id=site_id, actor=user.name, now=now,
                                     **fields)
    await session.commit()
    return plan


@router.get("/plans/{plan_id}", response_model=PlanPublic)
async def get_plan(plan: PlanDep) -> CommissioningPlan:
    """One plan."""
    return plan


@router.patch("/plans/{plan_id}", response_model=PlanPublic)
async def update_plan(session: SessionDep, user: StaffUser, now: NowDep, plan: PlanDep,
                      body: PlanUpdate) -> CommissioningPlan:
    """Edit a plan; an issued or scheduled plan returns to draft and needs issuing again."""
    plan = await service.update_plan(session, id_of(plan), actor=user.name, now=now,
                                     **body.fields())
    await session.commit()
    return plan


@router.post("/plans/{plan_id}/issue", response_model=DocumentPublic)
async def issue_plan(session: SessionDep, user: StaffUser, now: NowDep, plan: PlanDep
                     ) -> CommissioningDocument:
    """Issue the plan: renders and stores its next written version."""
    doc = await service.issue_plan(session, id_of(plan), actor=user.name, now=now)
    await session.commit()
    return doc


@router.post("/plans/{plan_id}/acknowledge", response_model=PlanPublic)
async def acknowledge_plan(session: SessionDep, user: CurrentUser, now: NowDep, plan: PlanDep
                           ) -> CommissioningPlan:
    """The customer acknowledges its issued plan (staff cannot do it for them)."""
    if Role(user.role) is not Role.CUSTOMER:
        raise Forbidden("only the customer acknowledges its commissioning plan")
    plan = await service.acknowledge_plan(session, id_of(plan), actor=user.name, now=now)
    await session.commit()
    return plan


@router.get("/plans/{plan_id}/documents", response_model=list[DocumentPublic])
async def list_documents(session: SessionDep, plan: PlanDep) -> list[CommissioningDocument]:
    """Every stored version of the written plan and the report."""
    rows = await session.exec(select(CommissioningDocument)
                              .where(CommissioningDocument.plan_id == plan.id)
                              .order_by(col(CommissioningDocument.id)))
    return list(rows.all())


@router.get("/plans/{plan_id}/document", response_class=Response)
async def plan_document(
    session: SessionDep, plan: PlanDep,
    fmt: Annotated[Literal["html", "pdf"], Query(alias="format")] = "html",
    version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Response:
    """The written plan (latest issued version, or `version`)."""
    doc = await service.latest_document(session, id_of(plan), "plan", version)
    return _download(doc.html, doc.pdf, doc.title, fmt)


@router.get("/plans/{plan_id}/report", response_model=None)
async def report(
    session: SessionDep, now: NowDep, plan: PlanDep,
    fmt: Annotated[Format, Query(alias="format")] = "json",
    version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Response | dict[str, Any]:
    """The commissioning report: the stored version (latest, or `version`); JSON without
    `version` is built afresh from the current results."""
    plan_id = id_of(plan)
    if fmt == "json" and version is None:
        return (await service.build(session, plan_id, now=now)).model_dump(mode="json")
    doc = await service.latest_document(session, plan_id, "report", version)
    if fmt == "json":
        return doc.data
    return _download(doc.html, doc.pdf, doc.title, fmt)


@router.post("/plans/{plan_id}/runs", response_model=RunPublic, status_code=202)
async def start_run(request: Request, session: SessionDep, user: StaffUser, now: NowDep,
                    plan: PlanDep) -> CommissioningRun:
    """Send `commissioning.check` to the site's agent; the report follows its answer."""
    commands = getattr(request.app.state, "commands", None)
    if commands is None:
        raise NoAgentChannel("this server has no command channel to the agents")
    site = await session.get(Site, plan.site_id)
    assert site is not None  # noqa: S101 - foreign key
    run, check = await service.start_run(session, id_of(plan), actor=user.name, now=now)
    await send_check(commands, session, site.code, run, check, user_id=user.id)
    await session.commit()
    return run


@router.get("/plans/{plan_id}/runs", response_model=list[RunPublic])
async def list_runs(session: SessionDep, plan: PlanDep) -> list[CommissioningRun]:
    """The plan's remote runs, oldest first."""
    rows = await session.exec(select(CommissioningRun).where(CommissioningRun.plan_id == plan.id)
                              .order_by(col(CommissioningRun.id)))
    return list(rows.all())


@router.post("/plans/{plan_id}/results", response_model=list[OnsitePublic], status_code=201)
async def record_results(session: SessionDep, user: StaffUser, now: NowDep, plan: PlanDep,
                         body: OnsiteBatch) -> list[OnsiteResult]:
    """On-site results of a technician (the caller), merged into the report."""
    rows = await service.record_onsite(session, id_of(plan),
                                       [r.model_dump() for r in body.results],
                                       technician=user.name, now=now)
    await session.commit()
    return rows


@router.get("/plans/{plan_id}/results", response_model=list[OnsitePublic])
async def list_results(session: SessionDep, plan: PlanDep) -> list[OnsiteResult]:
    """Every on-site result recorded for the plan."""
    rows = await session.exec(select(OnsiteResult).where(OnsiteResult.plan_id == plan.id)
                              .order_by(col(OnsiteResult.id)))
    return list(rows.all())


async def _move(session: SessionDep, user: User, now: datetime, plan: CommissioningPlan,
                target: str) -> CommissioningPlan:
    moved = await service.transition(session, id_of(plan), target, actor=user.name, now=now)
    await session.commit()
    return moved


@router.post("/plans/{plan_id}/schedule", response_model=PlanPublic)
async def schedule_plan(session: SessionDep, user: StaffUser, now: NowDep, plan: PlanDep
                        ) -> CommissioningPlan:
    """Schedule a plan the customer acknowledged."""
    return await _move(session, user, now, plan, "scheduled")


@router.post("/plans/{plan_id}/complete", response_model=PlanPublic)
async def complete_plan(session: SessionDep, user: StaffUser, now: NowDep, plan: PlanDep
                        ) -> CommissioningPlan:
    """Complete the plan: the units that passed are registered in the fleet."""
    return await _move(session, user, now, plan, "completed")


@router.post("/plans/{plan_id}/cancel", response_model=PlanPublic)
async def cancel_plan(session: SessionDep, user: StaffUser, now: NowDep, plan: PlanDep
                      ) -> CommissioningPlan:
    """Cancel the plan."""
    return await _move(session, user, now, plan, "cancelled")
