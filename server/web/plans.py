"""Upgrade-plan pages: the written plan, the customer's confirm-and-sign step, rollout progress.

Confirmation goes through the upgrades service (`server/upgrades/plans.py: confirm`), the
same function as `POST /api/v1/plans/{id}/confirm`: only a customer of the plan's
organisation can confirm an issued plan, picking one proposed window, naming its on-site
personnel and signing with its name; a new version of the written plan records it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.core.security import visible_orgs
from server.errors import NotFound
from server.models import User
from server.upgrades import plans as svc
from server.upgrades.models import PlanDocument, ReleasePackage, RolloutTarget, UpgradePlan
from server.web.auth import Csrf, StaffWebUser, WebUser
from server.web.live import topic
from server.web.render import render

router = APIRouter()
MAX_ROWS = 200


@topic("plans")
async def _plans_fingerprint(session: AsyncSession, user: User) -> tuple[Any, ...]:
    row = (await session.exec(
        select(func.count(), func.max(UpgradePlan.updated_at))
        .where(visible_orgs(user, col(UpgradePlan.org_id)))
    )).one()
    targets = (await session.exec(
        select(func.count(), func.max(RolloutTarget.id))
        .join(UpgradePlan, col(UpgradePlan.id) == col(RolloutTarget.plan_id))
        .where(visible_orgs(user, col(UpgradePlan.org_id)),
               col(RolloutTarget.state).in_(("done", "succeeded", "ok", "installed")))
    )).one()
    return (*tuple(row), *tuple(targets))


@router.get("/plans", response_class=HTMLResponse, include_in_schema=False)
async def plans_page(request: Request, user: WebUser) -> HTMLResponse:
    """Upgrade plans the user may see, newest first."""
    async with request.app.state.db.session() as session:
        rows = (await session.exec(
            select(UpgradePlan, ReleasePackage.version)
            .join(ReleasePackage, col(ReleasePackage.id) == col(UpgradePlan.release_id))
            .where(visible_orgs(user, col(UpgradePlan.org_id)))
            .order_by(col(UpgradePlan.id).desc()).limit(MAX_ROWS)
        )).all()
    return render(request, "plans.html", {"user": user, "plans": rows})


async def _plan(session: AsyncSession, user: User, plan_id: int) -> UpgradePlan:
    return await svc.get_plan(session, plan_id, user)


@router.get("/plans/{plan_id}", response_class=HTMLResponse, include_in_schema=False)
async def plan_page(request: Request, user: WebUser, plan_id: int) -> HTMLResponse:
    """The plan, its written document, the confirm-and-sign form, rollout progress by wave."""
    async with request.app.state.db.session() as session:
        plan = await _plan(session, user, plan_id)
        release = await session.get(ReleasePackage, plan.release_id)
        doc = (await session.exec(
            select(PlanDocument.version, PlanDocument.created_at)
            .where(PlanDocument.plan_id == plan_id).order_by(col(PlanDocument.version).desc())
        )).first()
        targets = (await session.exec(
            select(RolloutTarget).where(RolloutTarget.plan_id == plan_id)
            .order_by(col(RolloutTarget.wave), col(RolloutTarget.device))
        )).all()
    waves: dict[int, list[RolloutTarget]] = defaultdict(list)
    for t in targets:
        waves[t.wave].append(t)
    progress = {w: Counter(t.state for t in ts) for w, ts in waves.items()}
    return render(request, "plan.html", {
        "user": user, "p": plan, "release": release, "doc": doc, "waves": dict(waves),
        "progress": progress,
    })


@router.get("/plans/{plan_id}/document", response_class=HTMLResponse, include_in_schema=False)
async def plan_document(request: Request, user: WebUser, plan_id: int) -> HTMLResponse:
    """The latest version of the written plan (HTML rendered by server/documents.py)."""
    async with request.app.state.db.session() as session:
        await _plan(session, user, plan_id)
        doc = (await session.exec(
            select(PlanDocument).where(PlanDocument.plan_id == plan_id)
            .order_by(col(PlanDocument.version).desc())
        )).first()
    if doc is None:
        raise NotFound(f"plan {plan_id} has no written document yet")
    return HTMLResponse(doc.html, headers={"Content-Security-Policy": "sandbox",
                                           "Cache-Control": "no-store"})


@router.post("/plans/{plan_id}/confirm", include_in_schema=False, dependencies=[Csrf])
async def confirm(
    request: Request, user: WebUser, plan_id: int,
    window: Annotated[int, Form(ge=0, le=19)],
    personnel: Annotated[str, Form(min_length=1, max_length=4000)],
    signature: Annotated[str, Form(min_length=1, max_length=200)],
) -> RedirectResponse:
    """The customer confirms a window, names its personnel and signs."""
    names = [line.strip() for line in personnel.splitlines() if line.strip()][:20]
    async with request.app.state.db.session() as session:
        plan = await svc.get_plan(session, plan_id, user, lock=True)
        await svc.confirm(session, plan, user, window=window, personnel=names,
                          signature=signature, now=request.app.state.clock())
    return RedirectResponse(f"/plans/{plan_id}", status_code=303)


@router.get("/releases", response_class=HTMLResponse, include_in_schema=False)
async def releases_page(
    request: Request, user: StaffWebUser,
    series: Annotated[str | None, Query(max_length=16)] = None,
) -> HTMLResponse:
    """Accepted release packages (staff only): what each one fixes and which key signed it.

    Newest first; `series` narrows the list to one product line once it outgrows a page."""
    query = select(ReleasePackage)
    if series:
        query = query.where(ReleasePackage.series == series)
    async with request.app.state.db.session() as session:
        rows = (await session.exec(
            query.order_by(col(ReleasePackage.uploaded_at).desc(),
                           col(ReleasePackage.id).desc()).limit(MAX_ROWS)
        )).all()
        all_series = (await session.exec(
            select(ReleasePackage.series).distinct().order_by(col(ReleasePackage.series))
        )).all()
    return render(request, "releases.html", {"user": user, "releases": rows,
                                             "series": series or "", "all_series": all_series})
