"""`/api/v1/releases`, `/plans`, `/rollouts`: packages, written plans, live rollouts.

Staff (admin, engineer: the release manager) upload packages, write, issue, schedule, pause
and abort plans. A customer sees its organisation's plans, reads the written plan, confirms
it (window, personnel, signature) and checks its personnel in on site. Package downloads
are for agents: no bearer token, a signed, expiring link instead (server/upgrades/releases).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.api.deps import (
    CurrentUser,
    IdPath,
    NowDep,
    PageDep,
    SessionDep,
    StaffUser,
    get_settings,
    paginate,
)
from server.core.config import ServerSettings
from server.errors import InvalidInput, NotFound
from server.schemas import Page
from server.upgrades import plans as svc
from server.upgrades import releases
from server.upgrades.models import PlanDocument, ReleasePackage, RolloutTarget, UpgradePlan
from server.upgrades.schemas import (
    Checkin,
    Confirmation,
    DocumentPublic,
    PlanFields,
    PlanPublic,
    Reason,
    ReleasePublic,
    TargetPublic,
)

SettingsDep = Annotated[ServerSettings, Depends(get_settings)]

SERIES = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$"

releases_router = APIRouter(prefix="/releases", tags=["releases"])
plans_router = APIRouter(prefix="/plans", tags=["plans"])
rollouts_router = APIRouter(prefix="/rollouts", tags=["rollouts"])
routers = (releases_router, plans_router, rollouts_router)


# --- releases --------------------------------------------------------------------------------


@releases_router.post("", response_model=ReleasePublic, status_code=201)
async def upload_release(request: Request, session: SessionDep, user: StaffUser,
                         settings: SettingsDep, now: NowDep) -> ReleasePackage:
    """Upload a signed package (`emu release upload`); refused unless a trusted key signed it
    and the payload matches the manifest."""
    limit = int(settings.upgrades.max_package_mb * 1024 * 1024)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise InvalidInput(f"package larger than {settings.upgrades.max_package_mb:g} MB")
    row = await releases.accept_upload(session, settings, bytes(body), uploaded_by=user.name,
                                       now=now)
    await session.commit()
    return row


@releases_router.get("", response_model=Page[ReleasePublic])
async def list_releases(session: SessionDep, _user: StaffUser, page: PageDep,
                        series: Annotated[str | None, Query(pattern=SERIES)] = None,
                        ) -> Page[ReleasePackage]:
    """Packages, newest upload first."""
    stmt = select(ReleasePackage)
    if series is not None:
        stmt = stmt.where(ReleasePackage.series == series)
    rows, total = await paginate(session, stmt, page, col(ReleasePackage.id).desc())
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@releases_router.get("/{release_id}", response_model=ReleasePublic)
async def get_release(session: SessionDep, _user: StaffUser,
                      release_id: IdPath) -> ReleasePackage:
    """One package with its signed manifest."""
    return await releases.get_release(session, release_id)


@releases_router.get("/{release_id}/download", response_class=FileResponse)
async def download_release(session: SessionDep, settings: SettingsDep, now: NowDep,
                           release_id: IdPath, exp: Annotated[int, Query(ge=0, le=2**40)],
                           sig: Annotated[str, Query(pattern=r"^[0-9a-f]{64}$")],
                           ) -> FileResponse:
    """The payload for an agent, with `Range` support (a cut download resumes); the link's
    `exp` and `sig` are the credential (no bearer token)."""
    row = await releases.get_release(session, release_id)
    releases.check_download(settings, release_id, exp, sig, now)
    path = releases.releases_dir(settings) / row.path
    if not path.is_file():
        raise NotFound(f"release {release_id}: payload file missing on the server")
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"{row.series}-{row.version}-{row.kind}.bin")


# --- plans -----------------------------------------------------------------------------------


async def _public(session: AsyncSession, plan: UpgradePlan, now: datetime) -> PlanPublic:
    states = (await session.exec(select(RolloutTarget.state).where(
        RolloutTarget.plan_id == plan.id))).all()
    out = PlanPublic.model_validate(plan)
    out.delivery = svc.delivery(plan, now)
    out.counts = dict(Counter(states))
    return out


def _input(body: PlanFields) -> svc.PlanInput:
    return svc.PlanInput(
        title=body.title, release_id=body.release_id, site_ids=tuple(body.site_ids),
        from_versions=tuple(body.from_versions), rollback=body.rollback, impact=body.impact,
        risk=body.risk, risk_notes=body.risk_notes, rollback_plan=body.rollback_plan,
        windows=tuple(w.model_dump() for w in body.windows),
        personnel_required=body.personnel_required, canary=body.canary,
        wave_percentages=tuple(body.wave_percentages),
        success_threshold=body.success_threshold, failure_threshold=body.failure_threshold,
        concurrency_per_site=body.concurrency_per_site,
        concurrency_total=body.concurrency_total, checkin_required=body.checkin_required,
        settle_s=body.settle_s, limits=body.limits.model_dump(), requested_at=body.requested_at,
        ticket_id=body.ticket_id,
    )


@plans_router.post("", response_model=PlanPublic, status_code=201)
async def create_plan(session: SessionDep, user: StaffUser, now: NowDep,
                      body: PlanFields) -> PlanPublic:
    """Write a draft plan (a downgrade is refused unless `rollback` is set)."""
    plan = await svc.create_plan(session, _input(body), actor=user.name, now=now)
    await session.commit()
    return await _public(session, plan, now)


async def existing_plan(session: SessionDep, upgrade_plan_id: IdPath) -> UpgradePlan:
    """The plan of the path, locked (404 before the body is looked at)."""
    return await svc.get_plan(session, upgrade_plan_id, lock=True)


@plans_router.put("/{upgrade_plan_id}", response_model=PlanPublic)
async def replace_plan(session: SessionDep, user: StaffUser, now: NowDep,
                       plan: Annotated[UpgradePlan, Depends(existing_plan)],
                       body: PlanFields) -> PlanPublic:
    """Rewrite a draft plan (after `revise`, an issued one)."""
    await svc.update_plan(session, plan, _input(body), actor=user.name, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.get("", response_model=Page[PlanPublic])
async def list_plans(session: SessionDep, user: CurrentUser, page: PageDep, now: NowDep,
                     state: Annotated[str | None, Query(pattern=r"^[a-z_]{1,16}$")] = None,
                     ) -> Page[PlanPublic]:
    """Plans the caller may see (a customer: its organisation's), newest first."""
    stmt = select(UpgradePlan)
    if user.role == "customer":
        stmt = stmt.where(UpgradePlan.org_id == (user.org_id or -1))
    if state is not None:
        stmt = stmt.where(UpgradePlan.state == state)
    rows, total = await paginate(session, stmt, page, col(UpgradePlan.id).desc())
    data = [await _public(session, p, now) for p in rows]
    return Page(data=data, count=total, limit=page.limit, offset=page.offset)


@plans_router.get("/{upgrade_plan_id}", response_model=PlanPublic)
async def get_plan(session: SessionDep, user: CurrentUser, now: NowDep,
                   upgrade_plan_id: IdPath) -> PlanPublic:
    """One plan, with its 30-day delivery clock and rollout counts."""
    return await _public(session, await svc.get_plan(session, upgrade_plan_id, user), now)


@plans_router.post("/{upgrade_plan_id}/issue", response_model=PlanPublic)
async def issue_plan(session: SessionDep, user: StaffUser, now: NowDep,
                     upgrade_plan_id: IdPath) -> PlanPublic:
    """Fix the targets and issue the written plan to the customer."""
    plan = await svc.get_plan(session, upgrade_plan_id, lock=True)
    await svc.issue(session, plan, actor=user.name, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/revise", response_model=PlanPublic)
async def revise_plan(session: SessionDep, _user: StaffUser, now: NowDep,
                      upgrade_plan_id: IdPath) -> PlanPublic:
    """Take an issued plan back to draft to change it (issued documents are kept)."""
    plan = await svc.get_plan(session, upgrade_plan_id, lock=True)
    await svc.revise(session, plan, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/confirm", response_model=PlanPublic)
async def confirm_plan(session: SessionDep, user: CurrentUser, now: NowDep, upgrade_plan_id: IdPath,
                       body: Confirmation) -> PlanPublic:
    """The customer confirms: a window, its on-site personnel, and a signature."""
    plan = await svc.get_plan(session, upgrade_plan_id, user, lock=True)
    await svc.confirm(session, plan, user, window=body.window, personnel=body.personnel,
                      signature=body.signature, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/schedule", response_model=PlanPublic)
async def schedule_plan(session: SessionDep, user: StaffUser, now: NowDep,
                        upgrade_plan_id: IdPath) -> PlanPublic:
    """The vendor confirms the customer's window; the rollout starts when it opens."""
    plan = await svc.get_plan(session, upgrade_plan_id, lock=True)
    await svc.schedule(session, plan, actor=user.name, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/checkin", response_model=PlanPublic)
async def checkin_plan(session: SessionDep, user: CurrentUser, now: NowDep, upgrade_plan_id: IdPath,
                       body: Checkin) -> PlanPublic:
    """The customer's personnel report present at a site."""
    plan = await svc.get_plan(session, upgrade_plan_id, user)
    await svc.checkin(session, plan, user, body.site_id, body.name, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/pause", response_model=PlanPublic)
async def pause_plan(session: SessionDep, _user: StaffUser, now: NowDep,
                     upgrade_plan_id: IdPath) -> PlanPublic:
    """Start nothing new (installs under way finish)."""
    plan = await svc.get_plan(session, upgrade_plan_id, lock=True)
    await svc.set_paused(plan, True, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/resume", response_model=PlanPublic)
async def resume_plan(session: SessionDep, _user: StaffUser, now: NowDep,
                      upgrade_plan_id: IdPath) -> PlanPublic:
    """Carry on after a pause."""
    plan = await svc.get_plan(session, upgrade_plan_id, lock=True)
    await svc.set_paused(plan, False, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.post("/{upgrade_plan_id}/abort", response_model=PlanPublic)
async def abort_plan(session: SessionDep, _user: StaffUser, now: NowDep, upgrade_plan_id: IdPath,
                     body: Reason) -> PlanPublic:
    """Stop for good; units not started are left untouched."""
    plan = await svc.get_plan(session, upgrade_plan_id, lock=True)
    await svc.abort(session, plan, body.reason, now=now)
    await session.commit()
    return await _public(session, plan, now)


@plans_router.get("/{upgrade_plan_id}/documents", response_model=list[DocumentPublic])
async def list_documents(session: SessionDep, user: CurrentUser,
                         upgrade_plan_id: IdPath) -> list[PlanDocument]:
    """Every issued version of the written plan."""
    await svc.get_plan(session, upgrade_plan_id, user)
    rows = await session.exec(select(PlanDocument).where(PlanDocument.plan_id == upgrade_plan_id)
                              .order_by(col(PlanDocument.version)))
    return list(rows.all())


@plans_router.get("/{upgrade_plan_id}/documents/{doc_version}.{fmt}")
async def get_document(session: SessionDep, user: CurrentUser, upgrade_plan_id: IdPath,
                       doc_version: IdPath,
                       fmt: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")],
                       ) -> Response:
    """One version of the written plan as `html` or `pdf`."""
    await svc.get_plan(session, upgrade_plan_id, user)
    doc = (await session.exec(select(PlanDocument).where(
        PlanDocument.plan_id == upgrade_plan_id, PlanDocument.version == doc_version))).first()
    if doc is None:
        raise NotFound(f"plan {upgrade_plan_id} has no document version {doc_version}")
    if fmt not in ("html", "pdf"):
        raise NotFound("a document comes as .html or .pdf")
    if fmt == "pdf":
        name = f"upgrade-plan-{upgrade_plan_id}-v{doc_version}.pdf"
        return Response(doc.pdf, media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return Response(doc.html, media_type="text/html; charset=utf-8")


# --- rollouts --------------------------------------------------------------------------------


@rollouts_router.get("", response_model=Page[PlanPublic])
async def list_rollouts(session: SessionDep, user: CurrentUser, page: PageDep,
                        now: NowDep) -> Page[PlanPublic]:
    """Plans that are scheduled, running or finished (what the rollout engine works on)."""
    stmt = select(UpgradePlan).where(col(UpgradePlan.state).in_(
        ("scheduled", "running", "completed", "halted", "rolled_back")))
    if user.role == "customer":
        stmt = stmt.where(UpgradePlan.org_id == (user.org_id or -1))
    rows, total = await paginate(session, stmt, page, col(UpgradePlan.id).desc())
    data = [await _public(session, p, now) for p in rows]
    return Page(data=data, count=total, limit=page.limit, offset=page.offset)


@rollouts_router.get("/{upgrade_plan_id}", response_model=list[TargetPublic])
async def rollout_targets(session: SessionDep, user: CurrentUser,
                          upgrade_plan_id: IdPath) -> list[RolloutTarget]:
    """Every unit of a plan with its wave, state and latest progress stage (live)."""
    await svc.get_plan(session, upgrade_plan_id, user)
    rows = await session.exec(select(RolloutTarget).where(RolloutTarget.plan_id == upgrade_plan_id)
                              .order_by(col(RolloutTarget.wave), col(RolloutTarget.id)))
    return list(rows.all())
