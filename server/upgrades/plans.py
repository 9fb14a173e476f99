"""Upgrade plans: the written plan of clause 2.4 and its states.

    draft --issue--> issued --confirm (customer)--> confirmed --schedule (vendor)--> scheduled
      ^                |                                  rollout engine: --> running -->
      +----revise------+                    completed | halted | rolled_back

* issue: the targets are fixed (units of the series at the listed sites, optionally only
  those on given versions) and the written plan is rendered (HTML + PDF) and stored as a new
  version; the customer reads that document.
* confirm: a customer user of the plan's organisation picks one of the proposed windows,
  names its on-site personnel and signs (name and time are recorded; clause 2.4-2.5); the
  document is issued again with the confirmation in it.
* schedule: the vendor side confirms too, and the rollout engine may start in the window.

Windows are site-local wall times (`{"start": "2026-05-02T01:00", "end": "...T04:00"}`): the
same window means 01:00-04:00 in each site's own IANA zone, DST included. The 30-day clock
of clause 2.3 runs from `requested_at` (the upgrade request) and is shown on the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.packages import compare_versions
from server.api.deps import id_of
from server.documents import render_document_async
from server.errors import Conflict, Forbidden, InvalidInput, NotFound
from server.models import Organisation, Series, Site, Telemetry, Unit, User
from server.upgrades.models import (
    PlanDocument,
    ReleasePackage,
    RolloutTarget,
    SiteCheckin,
    UpgradePlan,
)

DELIVERY_DAYS = 30
TEMPLATE = "upgrade_plan"
FINAL = frozenset({"completed", "halted", "rolled_back"})


# --- windows ---------------------------------------------------------------------------------


def _local(text: str, field: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{field}: {text!r} is not an ISO-8601 local time") from exc
    if value.tzinfo is not None:
        raise InvalidInput(f"{field}: give site-local wall time without an offset")
    return value


def check_windows(windows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Validated windows (start before end, at most 24 h) in a canonical form."""
    out = []
    for i, w in enumerate(windows):
        start = _local(w.get("start", ""), f"windows[{i}].start")
        end = _local(w.get("end", ""), f"windows[{i}].end")
        if not start < end <= start + timedelta(hours=24):
            raise InvalidInput(f"windows[{i}]: end must be after start, within 24 hours")
        out.append({"start": start.isoformat(timespec="minutes"),
                    "end": end.isoformat(timespec="minutes")})
    return out


def zone(site: Site) -> ZoneInfo:
    """The site's time zone (UTC if its name is unknown to this machine)."""
    try:
        return ZoneInfo(site.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def window_utc(window: dict[str, str], site: Site) -> tuple[datetime, datetime]:
    """A site-local window as aware UTC bounds at that site."""
    tz = zone(site)
    start = datetime.fromisoformat(window["start"]).replace(tzinfo=tz)
    end = datetime.fromisoformat(window["end"]).replace(tzinfo=tz)
    return start.astimezone(ZoneInfo("UTC")), end.astimezone(ZoneInfo("UTC"))


def in_window(window: dict[str, str], site: Site, now: datetime) -> bool:
    """Whether `now` lies in the window, at that site: start inclusive, end exclusive."""
    start, end = window_utc(window, site)
    return start <= now < end


# --- plans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInput:
    """What a release manager writes into a plan."""

    title: str
    release_id: int
    site_ids: tuple[int, ...]
    from_versions: tuple[str, ...] = ()
    rollback: bool = False
    impact: str = ""
    risk: str = "low"
    risk_notes: str = ""
    rollback_plan: str = ""
    windows: tuple[dict[str, str], ...] = ()
    personnel_required: str = ""
    canary: int = 1
    wave_percentages: tuple[int, ...] = (50, 100)
    success_threshold: float = 1.0
    failure_threshold: int = 1
    concurrency_per_site: int = 1
    concurrency_total: int = 10
    checkin_required: bool = False
    settle_s: float = 30.0
    limits: dict[str, Any] | None = None
    requested_at: datetime | None = None
    ticket_id: int | None = None


async def create_plan(session: AsyncSession, data: PlanInput, *, actor: str,
                      now: datetime) -> UpgradePlan:
    """A draft plan; its sites must belong to one customer organisation."""
    plan = await _build(session, data, actor=actor, now=now)
    session.add(plan)
    await session.flush()
    await _link_ticket(session, plan, actor, now)
    return plan


async def update_plan(session: AsyncSession, plan: UpgradePlan, data: PlanInput, *,
                      actor: str, now: datetime) -> None:
    """Rewrite a draft plan."""
    _expect(plan, "draft")
    fresh = await _build(session, data, actor=actor, now=now)
    for name in ("title", "org_id", "release_id", "rollback", "series", "from_versions",
                 "site_ids", "impact", "risk", "risk_notes", "rollback_plan", "windows",
                 "personnel_required", "canary", "wave_percentages", "success_threshold",
                 "failure_threshold", "concurrency_per_site", "concurrency_total",
                 "checkin_required", "settle_s", "limits", "requested_at", "ticket_id"):
        setattr(plan, name, getattr(fresh, name))
    _touch(plan, now)
    session.add(plan)
    await _link_ticket(session, plan, actor, now)


async def _link_ticket(session: AsyncSession, plan: UpgradePlan, actor: str,
                       now: datetime) -> None:
    if plan.ticket_id is not None:
        from server.tickets.service import link

        await link(session, plan.ticket_id, "plan", str(plan.id), now=now, actor=actor)


async def _build(session: AsyncSession, data: PlanInput, *, actor: str,
                 now: datetime) -> UpgradePlan:
    release = await session.get(ReleasePackage, data.release_id)
    if release is None or release.kind != "full":
        raise InvalidInput(f"release {data.release_id} is not an uploaded full package")
    if not data.site_ids:
        raise InvalidInput("site_ids: name at least one site")
    sites = (await session.exec(select(Site).where(col(Site.id).in_(data.site_ids)))).all()
    if len(sites) != len(set(data.site_ids)):
        raise InvalidInput("site_ids: unknown site")
    orgs = {s.org_id for s in sites}
    if len(orgs) != 1:
        raise InvalidInput("site_ids: a plan is written to one customer; these sites belong "
                           "to several organisations")
    if await session.get(Organisation, next(iter(orgs))) is None:  # pragma: no cover - FK
        raise InvalidInput("the sites' organisation does not exist")
    if sorted(data.wave_percentages) != list(data.wave_percentages) or not data.wave_percentages \
            or data.wave_percentages[-1] != 100 or data.wave_percentages[0] <= 0:
        raise InvalidInput("wave_percentages: increasing, ending at 100 (e.g. [25, 50, 100])")
    plan = UpgradePlan(
        title=data.title, org_id=next(iter(orgs)), release_id=data.release_id,
        rollback=data.rollback, series=release.series, from_versions=list(data.from_versions),
        site_ids=sorted(set(data.site_ids)), impact=data.impact, risk=data.risk,
        risk_notes=data.risk_notes, rollback_plan=data.rollback_plan,
        windows=check_windows(data.windows), personnel_required=data.personnel_required,
        canary=data.canary, wave_percentages=list(data.wave_percentages),
        success_threshold=data.success_threshold, failure_threshold=data.failure_threshold,
        concurrency_per_site=data.concurrency_per_site, concurrency_total=data.concurrency_total,
        checkin_required=data.checkin_required, settle_s=data.settle_s,
        limits=dict(data.limits or {}), requested_at=data.requested_at or now,
        ticket_id=data.ticket_id, created_by=actor, created_at=now, updated_at=now,
    )
    await _check_targets(session, plan, release)
    return plan


async def get_plan(session: AsyncSession, plan_id: int, user: User | None = None, *,
                   lock: bool = False) -> UpgradePlan:
    """A plan the user may see (customers: their organisation's), else 404."""
    stmt = select(UpgradePlan).where(UpgradePlan.id == plan_id)
    if lock:
        stmt = stmt.with_for_update()
    plan = (await session.exec(stmt)).first()
    if plan is None or (user is not None and user.role == "customer"
                        and user.org_id != plan.org_id):
        raise NotFound(f"plan {plan_id} not found")
    return plan


def _expect(plan: UpgradePlan, *states: str) -> None:
    if plan.state not in states:
        raise Conflict(f"plan {plan.id} is {plan.state}; this needs {' or '.join(states)}")


async def current_versions(session: AsyncSession, units: Sequence[Unit]) -> dict[int, str | None]:
    """Each unit's running firmware: as last installed by a rollout, else its reported FwVer."""
    out: dict[int, str | None] = {u.id: u.firmware for u in units if u.id is not None}
    missing = [uid for uid, v in out.items() if v is None]
    if missing:
        latest = (
            select(Series.unit_id, func.max(Telemetry.ts).label("ts"))
            .join(Telemetry, col(Telemetry.series_id) == col(Series.id))
            .where(col(Series.unit_id).in_(missing), Series.point == "emu.FwVer")
            .group_by(col(Series.unit_id)).subquery()
        )
        rows = (await session.exec(
            select(Series.unit_id, Telemetry.text)
            .join(Telemetry, col(Telemetry.series_id) == col(Series.id))
            .join(latest, (latest.c.unit_id == col(Series.unit_id))
                  & (latest.c.ts == col(Telemetry.ts)))
            .where(Series.point == "emu.FwVer")
        )).all()
        for uid, text in rows:
            out[uid] = text
    return out


async def candidate_units(session: AsyncSession,
                          plan: UpgradePlan) -> list[tuple[Unit, str | None]]:
    """Units of the plan's series at its sites, with their running versions."""
    units = (await session.exec(
        select(Unit).where(col(Unit.site_id).in_(plan.site_ids), Unit.series == plan.series)
        .order_by(col(Unit.site_id), col(Unit.device))
    )).all()
    versions = await current_versions(session, units)
    return [(u, versions.get(u.id or 0)) for u in units]


async def _check_targets(session: AsyncSession, plan: UpgradePlan,
                         release: ReleasePackage) -> list[tuple[Unit, str | None]]:
    """Targets of the plan; refuses a downgrade (server side) unless the plan is a rollback."""
    chosen = []
    for unit, version in await candidate_units(session, plan):
        if plan.from_versions and version not in plan.from_versions:
            continue
        if version == release.version:
            continue  # already there: never installed twice
        if version is not None:
            order = compare_versions(release.version, version)
            if order < 0 and not plan.rollback:
                raise InvalidInput(
                    f"downgrade refused: {unit.device} runs {version}, newer than release "
                    f"{release.version}; a downgrade needs a rollback plan")
            if order > 0 and plan.rollback:
                raise InvalidInput(f"a rollback plan installs an older version; {unit.device} "
                                   f"runs {version}, older than {release.version}")
        chosen.append((unit, version))
    return chosen


def assign_waves(count: int, canary: int, percentages: Sequence[int]) -> list[int]:
    """Wave number of each of `count` targets: 0 the canary, then cumulative percentages."""
    waves: list[int] = []
    canary = min(max(canary, 0), count)
    waves.extend([0] * canary)
    for n, pct in enumerate(percentages, start=1):
        upto = max(canary, -(-count * pct // 100))
        waves.extend([n] * (upto - len(waves)))
    waves.extend([len(percentages)] * (count - len(waves)))
    return waves


async def issue(session: AsyncSession, plan: UpgradePlan, *, actor: str,
                now: datetime) -> PlanDocument:
    """Fix the targets and issue the written plan (a new document version)."""
    _expect(plan, "draft")
    if not plan.windows:
        raise InvalidInput("propose at least one window before issuing the plan")
    release = await _release(session, plan)
    chosen = await _check_targets(session, plan, release)
    if not chosen:
        raise InvalidInput("no unit matches the plan's targets (series, sites, versions)")
    for old in (await session.exec(select(RolloutTarget).where(
            RolloutTarget.plan_id == plan.id))).all():
        await session.delete(old)
    await session.flush()
    for (unit, version), wave in zip(chosen, assign_waves(len(chosen), plan.canary,
                                                          plan.wave_percentages), strict=True):
        session.add(RolloutTarget(plan_id=id_of(plan), unit_id=id_of(unit), site_id=unit.site_id,
                                  device=unit.device, wave=wave, from_version=version,
                                  to_version=release.version))
    plan.state = "issued"
    _touch(plan, now)
    doc = await render(session, plan, now=now, actor=actor)
    if plan.ticket_id is not None:  # waiting on the customer to confirm a window
        from server.tickets.service import pause_clocks

        await pause_clocks(session, plan.ticket_id, "window", now=now)
    return doc


async def revise(session: AsyncSession, plan: UpgradePlan, *, now: datetime) -> None:
    """Back to draft to change an issued plan (its documents are kept)."""
    _expect(plan, "issued")
    plan.state = "draft"
    _touch(plan, now)


async def confirm(session: AsyncSession, plan: UpgradePlan, user: User, *, window: int,
                  personnel: Sequence[str], signature: str, now: datetime) -> PlanDocument:
    """The customer picks a window, names its on-site personnel and signs."""
    _expect(plan, "issued")
    if user.role != "customer" or user.org_id != plan.org_id:
        raise Forbidden("only a customer user of the plan's organisation confirms it")
    if not 0 <= window < len(plan.windows):
        raise InvalidInput(f"window: pick one of 0..{len(plan.windows) - 1}")
    names = [p.strip() for p in personnel if p.strip()]
    if not names:
        raise InvalidInput("personnel: name the maintenance personnel who will be on site")
    if not signature.strip():
        raise InvalidInput("signature: type your name to sign")
    plan.confirmed_window = dict(plan.windows[window])
    plan.confirmed_personnel = names
    plan.confirmed_by = signature.strip()
    plan.confirmed_user_id = user.id
    plan.confirmed_at = now
    plan.state = "confirmed"
    _touch(plan, now)
    if plan.ticket_id is not None:
        from server.tickets.service import resume_clocks

        await resume_clocks(session, plan.ticket_id, "window", now=now)
    return await render(session, plan, now=now, actor=user.name)


async def schedule(session: AsyncSession, plan: UpgradePlan, *, actor: str,
                   now: datetime) -> None:
    """The vendor confirms the customer's window: the rollout engine may start in it."""
    _expect(plan, "confirmed")
    plan.state = "scheduled"
    plan.scheduled_by, plan.scheduled_at = actor, now
    _touch(plan, now)


async def set_paused(plan: UpgradePlan, paused: bool, *, now: datetime) -> None:
    """Pause (nothing new starts; running installs finish) or resume."""
    _expect(plan, "scheduled", "running")
    plan.paused = paused
    _touch(plan, now)


async def abort(session: AsyncSession, plan: UpgradePlan, reason: str, *, now: datetime) -> None:
    """Stop for good: units not started are skipped; running installs finish."""
    _expect(plan, "draft", "issued", "confirmed", "scheduled", "running")
    from server.upgrades.rollout import halt

    await halt(session, plan, f"aborted: {reason}" if reason else "aborted", now)


async def checkin(session: AsyncSession, plan: UpgradePlan, user: User, site_id: int,
                  name: str, *, now: datetime) -> SiteCheckin:
    """The customer's personnel report present at a site (needed first if `checkin_required`)."""
    _expect(plan, "confirmed", "scheduled", "running")
    if user.role == "customer" and user.org_id != plan.org_id:
        raise Forbidden("not your organisation's plan")
    if site_id not in plan.site_ids:
        raise InvalidInput(f"site {site_id} is not in plan {plan.id}")
    if not name.strip():
        raise InvalidInput("name: who is on site")
    existing = (await session.exec(select(SiteCheckin).where(
        SiteCheckin.plan_id == plan.id, SiteCheckin.site_id == site_id))).first()
    if existing is not None:
        return existing
    row = SiteCheckin(plan_id=id_of(plan), site_id=site_id, name=name.strip(), user_id=user.id,
                      at=now)
    session.add(row)
    await session.flush()
    return row


def _touch(plan: UpgradePlan, now: datetime) -> None:
    plan.updated_at = now


async def _release(session: AsyncSession, plan: UpgradePlan) -> ReleasePackage:
    release = await session.get(ReleasePackage, plan.release_id)
    if release is None:  # pragma: no cover - foreign key
        raise NotFound(f"release {plan.release_id} not found")
    return release


def delivery(plan: UpgradePlan, now: datetime) -> dict[str, Any]:
    """The 30-day clock of clause 2.3: requested, due, days left (negative: late)."""
    due = plan.requested_at + timedelta(days=DELIVERY_DAYS)
    end = plan.finished_at if plan.state == "completed" and plan.finished_at else now
    return {"requested_at": plan.requested_at.isoformat(), "due_at": due.isoformat(),
            "days_left": round((due - end).total_seconds() / 86400, 1),
            "met": plan.state == "completed" and end <= due}


# --- the written plan ------------------------------------------------------------------------


async def render(session: AsyncSession, plan: UpgradePlan, *, now: datetime,
                 actor: str) -> PlanDocument:
    """Render and store the next version of the written plan."""
    context = await document_context(session, plan, now)
    plan.document_version += 1
    context["version"] = plan.document_version
    context["issued_by"] = actor
    doc = await render_document_async(TEMPLATE, context)
    row = PlanDocument(plan_id=id_of(plan), version=plan.document_version,
                       title=f"{doc.title}: {plan.title}"[:300], html=doc.html,
                       pdf=doc.pdf, created_at=now)
    session.add(row)
    session.add(plan)
    await session.flush()
    return row


async def document_context(session: AsyncSession, plan: UpgradePlan,
                           now: datetime) -> dict[str, Any]:
    """Everything the template shows."""
    release = await _release(session, plan)
    org = await session.get(Organisation, plan.org_id)
    sites = {s.id: s for s in (await session.exec(
        select(Site).where(col(Site.id).in_(plan.site_ids)))).all()}
    targets = (await session.exec(select(RolloutTarget).where(
        RolloutTarget.plan_id == plan.id).order_by(col(RolloutTarget.wave),
                                                  col(RolloutTarget.id)))).all()
    per_site: dict[int, list[RolloutTarget]] = {}
    for t in targets:
        per_site.setdefault(t.site_id, []).append(t)
    previous = sorted({t.from_version for t in targets if t.from_version})
    return {
        "plan": plan, "release": release, "fixes": release.manifest.get("fixes", {}),
        "customer": org.name if org else str(plan.org_id),
        "sites": [{"site": sites[sid], "units": per_site.get(sid, [])}
                  for sid in plan.site_ids if sid in sites],
        "waves": _describe_waves(targets), "previous_versions": previous,
        "delivery": delivery(plan, now), "now": now.isoformat(timespec="minutes"),
        "target_count": len(targets),
    }


def _describe_waves(targets: Iterable[RolloutTarget]) -> list[dict[str, Any]]:
    waves: dict[int, list[str]] = {}
    for t in targets:
        waves.setdefault(t.wave, []).append(t.device)
    return [{"wave": w, "name": "canary" if w == 0 else f"wave {w}", "units": len(d),
             "devices": d} for w, d in sorted(waves.items())]
