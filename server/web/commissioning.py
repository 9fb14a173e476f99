"""Commissioning pages: the plans of the visible sites, one plan with its merged report, and
the customer's acknowledgement.

Visibility is the API's (`get_visible` on the plan's site: another organisation's plan is a
404), and the acknowledgement calls the same service function as
`POST /api/v1/commissioning/plans/{id}/acknowledge`. The API authenticates bearer tokens only,
so the document and report downloads are served here too, through the same service look-ups
(`latest_document`, `build`) and the API's own `_download`, with the log-in cookie.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.api.deps import get_visible
from server.commissioning import service
from server.commissioning.api import _download
from server.commissioning.models import CommissioningDocument, CommissioningPlan
from server.core.security import Role, visible_sites
from server.errors import Forbidden
from server.models import Site, User
from server.schemas import MAX_ID
from server.web.auth import Csrf, WebUser
from server.web.live import topic
from server.web.render import render

router = APIRouter()
MAX_ROWS = 200


@topic("commissioning")
async def _fingerprint(session: AsyncSession, user: User) -> tuple[Any, ...]:
    row = (await session.exec(
        select(func.count(), func.max(CommissioningPlan.updated_at))
        .where(visible_sites(user, col(CommissioningPlan.site_id)))
    )).one()
    docs = (await session.exec(
        select(func.max(CommissioningDocument.id))
        .join(CommissioningPlan, col(CommissioningPlan.id) == col(CommissioningDocument.plan_id))
        .where(visible_sites(user, col(CommissioningPlan.site_id)))
    )).one()
    return (*tuple(row), docs)


async def _visible(session: AsyncSession, user: User, plan_id: int) -> CommissioningPlan:
    return await get_visible(session, user, CommissioningPlan, plan_id,
                             col(CommissioningPlan.site_id))


@router.get("/commissioning", response_class=HTMLResponse, include_in_schema=False)
async def plans_page(request: Request, user: WebUser) -> HTMLResponse:
    """Commissioning plans of the sites the user may see, newest first."""
    async with request.app.state.db.session() as session:
        rows = (await session.exec(
            select(CommissioningPlan, Site.name)
            .join(Site, col(Site.id) == col(CommissioningPlan.site_id))
            .where(visible_sites(user, col(CommissioningPlan.site_id)))
            .order_by(col(CommissioningPlan.id).desc()).limit(MAX_ROWS)
        )).all()
    return render(request, "commissioning_plans.html", {"user": user, "plans": rows})


@router.get("/commissioning/{plan_id}", response_class=HTMLResponse, include_in_schema=False)
async def plan_page(request: Request, user: WebUser, plan_id: int) -> HTMLResponse:
    """State, equipment, technicians, the report as of now, downloads, the acknowledge form."""
    now = request.app.state.clock()
    async with request.app.state.db.session() as session:
        plan = await _visible(session, user, plan_id)
        site = await session.get(Site, plan.site_id)
        report = await service.build(session, plan_id, now=now)
        docs = (await session.exec(
            select(CommissioningDocument.kind, CommissioningDocument.version,
                   CommissioningDocument.created_at)
            .where(CommissioningDocument.plan_id == plan_id)
            .order_by(col(CommissioningDocument.id).desc())
        )).all()
    latest = {kind: (version, at) for kind, version, at in reversed(docs)}
    return render(request, "commissioning_plan.html", {
        "user": user, "p": plan, "site": site, "report": report, "latest": latest,
    })


@router.get("/commissioning/{plan_id}/document", include_in_schema=False)
async def plan_document(
    request: Request, user: WebUser, plan_id: int,
    fmt: Annotated[Literal["html", "pdf"], Query(alias="format")] = "html",
) -> Response:
    """The latest issued written plan (HTML sandboxed, or the PDF as a download)."""
    async with request.app.state.db.session() as session:
        await _visible(session, user, plan_id)
        doc = await service.latest_document(session, plan_id, "plan", None)
    return _sandboxed(_download(doc.html, doc.pdf, doc.title, fmt))


@router.get("/commissioning/{plan_id}/report", include_in_schema=False)
async def plan_report(
    request: Request, user: WebUser, plan_id: int,
    fmt: Annotated[Literal["html", "pdf", "json"], Query(alias="format")] = "html",
    version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Response:
    """The report: JSON as of now (like the API), or a stored version as HTML or PDF."""
    async with request.app.state.db.session() as session:
        await _visible(session, user, plan_id)
        if fmt == "json" and version is None:
            report = await service.build(session, plan_id, now=request.app.state.clock())
            return JSONResponse(report.model_dump(mode="json"))
        doc = await service.latest_document(session, plan_id, "report", version)
    if fmt == "json":
        return JSONResponse(doc.data)
    return _sandboxed(_download(doc.html, doc.pdf, doc.title, fmt))


def _sandboxed(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = "sandbox"
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/commissioning/{plan_id}/acknowledge", include_in_schema=False,
             dependencies=[Csrf])
async def acknowledge(request: Request, user: WebUser, plan_id: int) -> RedirectResponse:
    """The customer acknowledges its issued plan (staff cannot do it for them)."""
    async with request.app.state.db.session() as session:
        await _visible(session, user, plan_id)
        if Role(user.role) is not Role.CUSTOMER:
            raise Forbidden("only the customer acknowledges its commissioning plan")
        await service.acknowledge_plan(session, plan_id, actor=user.name,
                                       now=request.app.state.clock())
    return RedirectResponse(f"/commissioning/{plan_id}", status_code=303)

