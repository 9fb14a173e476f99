"""The commissioning service: what the API, the CLI and the command channel call.

Every function is async, takes the caller's `AsyncSession` first and never commits (the API
route does), and takes `now` from the caller's clock. Plans move through `MOVES`; each issue
renders and stores the written plan (a new version); each new remote outcome or on-site
result renders and stores a new report version; completing the plan registers the units that
passed as fleet `Unit` rows with their nameplate data.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.commissioning import CheckOutcome, CheckRequest, Target
from server.commissioning.checklist import default_checklist, profile_of, requirements_for
from server.commissioning.errors import IllegalPlanMove, PlanInputError, PlanNotFound
from server.commissioning.models import (
    CommissioningDocument,
    CommissioningPlan,
    CommissioningRun,
    OnsiteResult,
)
from server.commissioning.report import OnsiteEntry, Report, build_report
from server.documents import render_document_async
from server.models import Organisation, Site, Unit

MODES = ("remote", "onsite")
STATES = ("draft", "issued", "scheduled", "in_progress", "completed", "cancelled")
MOVES: dict[str, tuple[str, ...]] = {
    "draft": ("issued", "cancelled"),
    "issued": ("draft", "scheduled", "cancelled"),
    "scheduled": ("draft", "in_progress", "cancelled"),
    "in_progress": ("completed", "cancelled"),
    "completed": (),
    "cancelled": (),
}
EDITABLE = ("draft", "issued", "scheduled")
RUNNABLE = ("scheduled", "in_progress")
PLAN_FIELDS = ("title", "mode", "visits", "starts_on", "ends_on", "technicians", "equipment",
               "targets", "checklist", "notes", "ticket_id")


def _pk(value: int | None) -> int:
    if value is None:
        raise RuntimeError("row has no id: flush first")
    return value


def _move(plan: CommissioningPlan, target: str) -> None:
    if target not in MOVES[plan.state]:
        raise IllegalPlanMove(f"plan {plan.id} is {plan.state}; it cannot become {target}")
    plan.state = target


def validate_plan(fields: dict[str, Any]) -> dict[str, Any]:
    """Check equipment series against the shipped profiles, and derive the checklist."""
    if fields.get("mode") not in MODES:
        raise PlanInputError(f"mode must be one of {', '.join(MODES)}")
    equipment = fields.get("equipment") or []
    if not equipment:
        raise PlanInputError("equipment: at least one series to commission")
    seen = set()
    for item in equipment:
        serials = item.get("serials") or []
        if len(serials) > int(item["count"]):
            raise PlanInputError(f"equipment {item['series']}: more serials than units")
        if item["series"] in seen:
            raise PlanInputError(f"equipment: series {item['series']} listed twice")
        seen.add(item["series"])
        requirements_for(item)  # an unknown series or profile without requirements raises
        if not item.get("type"):
            spec = profile_of(item["series"]).commissioning
            item["type"] = spec.type if spec else item["series"]
    starts, ends = fields.get("starts_on"), fields.get("ends_on")
    if isinstance(starts, date) and isinstance(ends, date) and ends < starts:
        raise PlanInputError("ends_on is before starts_on")
    for target in fields.get("targets") or []:
        try:
            Target.model_validate(target)
        except ValueError as exc:
            raise PlanInputError(f"targets: {exc}") from exc
    if not fields.get("checklist"):
        fields["checklist"] = default_checklist(equipment, fields["mode"])
    return fields


async def get_plan(session: AsyncSession, plan_id: int, *, lock: bool = False
                   ) -> CommissioningPlan:
    """The plan, or PlanNotFound (visibility is the API's business)."""
    query = select(CommissioningPlan).where(CommissioningPlan.id == plan_id)
    if lock:
        query = query.with_for_update()
    plan = (await session.exec(query.execution_options(populate_existing=True))).first()
    if plan is None:
        raise PlanNotFound(f"commissioning plan {plan_id} not found")
    return plan


async def create_plan(session: AsyncSession, *, site_id: int, actor: str | None, now: datetime,
                      **fields: Any) -> CommissioningPlan:
    """A draft plan (technicians, equipment, dates...), linked to its ticket if one is given."""
    if await session.get(Site, site_id) is None:
        raise PlanInputError(f"site {site_id} does not exist")
    fields = validate_plan(fields)
    plan = CommissioningPlan(site_id=site_id, created_by=actor, created_at=now, updated_at=now,
                             **{k: v for k, v in fields.items() if k in PLAN_FIELDS})
    session.add(plan)
    await session.flush()
    if plan.ticket_id is not None:
        await _link_ticket(session, plan, now, actor)
    return plan


async def _link_ticket(session: AsyncSession, plan: CommissioningPlan, now: datetime,
                       actor: str | None) -> None:
    from server.tickets import service as tickets
    from server.tickets.errors import TicketNotFound

    try:
        ticket = await tickets.get_ticket(session, _pk(plan.ticket_id))
    except TicketNotFound as exc:
        raise PlanInputError(f"ticket {plan.ticket_id} does not exist") from exc
    if ticket.site_id != plan.site_id:
        raise PlanInputError(f"ticket {ticket.id} is not of site {plan.site_id}")
    await tickets.link(session, _pk(ticket.id), "commissioning", _pk(plan.id), now=now,
                       state=plan.state, actor=actor)


async def update_plan(session: AsyncSession, plan_id: int, *, actor: str | None, now: datetime,
                      **changes: Any) -> CommissioningPlan:
    """Edit a plan; an issued or scheduled plan goes back to draft (re-issue makes v+1)."""
    plan = await get_plan(session, plan_id, lock=True)
    if plan.state not in EDITABLE:
        raise IllegalPlanMove(f"plan {plan_id} is {plan.state}; it can no longer be edited")
    current = {k: getattr(plan, k) for k in PLAN_FIELDS}
    if "equipment" in changes or "mode" in changes:
        current["checklist"] = {}
    merged = validate_plan({**current, **changes})
    for key in PLAN_FIELDS:
        setattr(plan, key, merged.get(key))
    if plan.state != "draft":
        _move(plan, "draft")
    plan.acknowledged_at = plan.acknowledged_by = None
    plan.updated_at = now
    session.add(plan)
    await session.flush()
    if plan.ticket_id is not None and "ticket_id" in changes:
        await _link_ticket(session, plan, now, actor)
    return plan


async def plan_context(session: AsyncSession, plan: CommissioningPlan) -> dict[str, Any]:
    """What the plan template shows."""
    site = await session.get(Site, plan.site_id)
    assert site is not None  # noqa: S101 - foreign key
    org = await session.get(Organisation, site.org_id)

    def when(value: datetime | None) -> str | None:
        return value.strftime("%Y-%m-%d %H:%M UTC") if value else None

    return {"plan": {
        "id": plan.id, "number": f"CP-{_pk(plan.id):04d}", "version": plan.version,
        "title": plan.title,
        "issued_at": when(plan.issued_at), "issued_by": plan.issued_by,
        "customer": org.name if org else "-", "mode": plan.mode,
        "site": {"code": site.code, "name": site.name, "timezone": site.timezone},
        "visits": plan.visits,
        "starts_on": plan.starts_on.isoformat() if plan.starts_on else "to be agreed",
        "ends_on": plan.ends_on.isoformat() if plan.ends_on else "to be agreed",
        "technicians": plan.technicians,
        "ticket_id": plan.ticket_id, "notes": plan.notes, "equipment": plan.equipment,
        "checklist": plan.checklist, "acknowledged_at": when(plan.acknowledged_at),
        "acknowledged_by": plan.acknowledged_by,
    }}


async def _store(session: AsyncSession, plan: CommissioningPlan, kind: str, template: str,
                 context: dict[str, Any], data: dict[str, Any], now: datetime
                 ) -> CommissioningDocument:
    last = (await session.exec(
        select(CommissioningDocument.version)
        .where(CommissioningDocument.plan_id == plan.id, CommissioningDocument.kind == kind)
        .order_by(col(CommissioningDocument.version).desc()).limit(1))).first()
    doc = await render_document_async(template, context)
    row = CommissioningDocument(plan_id=_pk(plan.id), kind=kind, version=(last or 0) + 1,
                                title=doc.title[:200], html=doc.html, pdf=doc.pdf, data=data,
                                created_at=now)
    session.add(row)
    await session.flush()
    return row


async def issue_plan(session: AsyncSession, plan_id: int, *, actor: str | None, now: datetime
                     ) -> CommissioningDocument:
    """Issue the plan: a new version of the written plan is rendered and stored."""
    plan = await get_plan(session, plan_id, lock=True)
    if not plan.technicians:
        raise PlanInputError("a plan is issued with its technicians designated")
    _move(plan, "issued")
    plan.version += 1
    plan.issued_at, plan.issued_by, plan.updated_at = now, actor, now
    session.add(plan)
    context = await plan_context(session, plan)
    doc = await _store(session, plan, "plan", "commissioning_plan", context, context["plan"], now)
    await _note_ticket(session, plan, f"issued (version {plan.version})", actor, now)
    return doc


async def acknowledge_plan(session: AsyncSession, plan_id: int, *, actor: str, now: datetime
                           ) -> CommissioningPlan:
    """The customer acknowledges the issued plan (its current version)."""
    plan = await get_plan(session, plan_id, lock=True)
    if plan.state != "issued":
        raise IllegalPlanMove(f"plan {plan_id} is {plan.state}; only an issued plan is "
                              "acknowledged")
    plan.acknowledged_at, plan.acknowledged_by, plan.updated_at = now, actor, now
    session.add(plan)
    await session.flush()
    await _note_ticket(session, plan, "acknowledged by the customer", actor, now)
    return plan


async def transition(session: AsyncSession, plan_id: int, target: str, *, actor: str | None,
                     now: datetime) -> CommissioningPlan:
    """schedule (needs the customer's acknowledgement), start, complete, cancel."""
    plan = await get_plan(session, plan_id, lock=True)
    if target == "scheduled" and plan.acknowledged_at is None:
        raise IllegalPlanMove(f"plan {plan_id} is not acknowledged by the customer yet")
    if target == "completed":
        await register_passed_units(session, plan, now)
        plan.completed_at = now
    _move(plan, target)
    plan.updated_at = now
    session.add(plan)
    await session.flush()
    await _note_ticket(session, plan, target, actor, now)
    return plan


async def _note_ticket(session: AsyncSession, plan: CommissioningPlan, what: str,
                       actor: str | None, now: datetime) -> None:
    """Write the plan's move on its ticket's timeline, if it has a ticket."""
    if plan.ticket_id is None:
        return
    from server.tickets import service as tickets

    await tickets.record(session, plan.ticket_id, "commissioning",
                         f"commissioning plan CP-{_pk(plan.id):04d} {what}", actor=actor,
                         detail={"plan_id": plan.id, "state": plan.state, "move": what,
                                 "version": plan.version}, now=now)


def check_request(plan: CommissioningPlan, run_id: int | None = None) -> CheckRequest:
    """The `commissioning.check` arguments for a plan."""
    if not plan.targets:
        raise PlanInputError(f"plan {plan.id} has no targets (addresses and unit ids to probe)")
    return CheckRequest(
        plan_id=_pk(plan.id), run_id=run_id,
        targets=tuple(Target.model_validate(t) for t in plan.targets),
        requirements={i["series"]: requirements_for(i) for i in plan.equipment},
    )


async def start_run(session: AsyncSession, plan_id: int, *, actor: str | None, now: datetime
                    ) -> tuple[CommissioningRun, CheckRequest]:
    """A new remote run (the caller sends the command); the plan goes in progress."""
    plan = await get_plan(session, plan_id, lock=True)
    if plan.state not in RUNNABLE:
        raise IllegalPlanMove(f"plan {plan_id} is {plan.state}; schedule it before running")
    if plan.state == "scheduled":
        _move(plan, "in_progress")
        plan.updated_at = now
        session.add(plan)
    check_request(plan)  # validates before a run row exists
    run = CommissioningRun(plan_id=plan_id, requested_by=actor, requested_at=now)
    session.add(run)
    await session.flush()
    return run, check_request(plan, _pk(run.id))


async def record_outcome(session: AsyncSession, run_id: int, outcome: CheckOutcome | None, *,
                         error: str | None = None, now: datetime) -> CommissioningRun:
    """The agent's answer (or its error) for a run; a new report version is stored."""
    run = await session.get(CommissioningRun, run_id)
    if run is None:
        raise PlanNotFound(f"commissioning run {run_id} not found")
    run.finished_at = now
    run.state = "done" if outcome is not None else "failed"
    run.outcome = outcome.model_dump(mode="json") if outcome is not None else None
    run.error = error
    session.add(run)
    await session.flush()
    if outcome is not None:
        await store_report(session, run.plan_id, now=now)
    return run


async def record_onsite(session: AsyncSession, plan_id: int, results: Sequence[dict[str, Any]],
                        *, technician: str, now: datetime) -> list[OnsiteResult]:
    """Checks a technician did on site (by unit serial); the plan goes in progress."""
    plan = await get_plan(session, plan_id, lock=True)
    if plan.state not in RUNNABLE:
        raise IllegalPlanMove(f"plan {plan_id} is {plan.state}; schedule it before recording")
    known = {item["name"] for items in plan.checklist.values() for item in items}
    rows = []
    for r in results:
        if r["check"] not in known:
            raise PlanInputError(f"check {r['check']!r} is not on the plan's checklist")
        row = OnsiteResult(plan_id=plan_id, technician=technician, recorded_at=now,
                           serial=str(r["serial"]), series=r.get("series"), check=r["check"],
                           passed=bool(r["passed"]), detail=r.get("detail") or "",
                           evidence=r.get("evidence") or {})
        session.add(row)
        rows.append(row)
    if plan.state == "scheduled":
        _move(plan, "in_progress")
        plan.updated_at = now
        session.add(plan)
    await session.flush()
    await store_report(session, plan_id, now=now)
    return rows


async def latest_run(session: AsyncSession, plan_id: int) -> CommissioningRun | None:
    """The newest run that brought an outcome."""
    return (await session.exec(
        select(CommissioningRun)
        .where(CommissioningRun.plan_id == plan_id, CommissioningRun.state == "done")
        .order_by(col(CommissioningRun.id).desc()).limit(1))).first()


async def build(session: AsyncSession, plan_id: int, *, now: datetime) -> Report:
    """The report as of now, from the newest remote outcome and every on-site result."""
    plan = await get_plan(session, plan_id)
    ctx = (await plan_context(session, plan))["plan"]
    run = await latest_run(session, plan_id)
    outcome = CheckOutcome.model_validate(run.outcome) if run and run.outcome else None
    onsite = (await session.exec(
        select(OnsiteResult).where(OnsiteResult.plan_id == plan_id))).all()
    return build_report(
        plan_id=plan_id, plan_version=plan.version, title=plan.title, customer=ctx["customer"],
        site=ctx["site"], mode=plan.mode, equipment=plan.equipment, checklist=plan.checklist,
        clock_tolerance_s={i["series"]: requirements_for(i).clock_tolerance_s
                           for i in plan.equipment},
        outcome=outcome, received_at=run.finished_at if run else None,
        run_id=run.id if run else None,
        onsite=[OnsiteEntry.model_validate(r, from_attributes=True) for r in onsite], now=now,
    )


async def store_report(session: AsyncSession, plan_id: int, *, now: datetime
                       ) -> CommissioningDocument:
    """Render the current report and keep it as the plan's newest report version."""
    plan = await get_plan(session, plan_id)
    report = await build(session, plan_id, now=now)
    data = report.model_dump(mode="json")
    context = {"report": data, "number": f"CP-{plan_id:04d}"}
    return await _store(session, plan, "report", "commissioning_report", context, data, now)


async def latest_document(session: AsyncSession, plan_id: int, kind: str, version: int | None
                          ) -> CommissioningDocument:
    """The newest (or the given) version of the plan's written plan or report."""
    query = select(CommissioningDocument).where(CommissioningDocument.plan_id == plan_id,
                                                CommissioningDocument.kind == kind)
    if version is not None:
        query = query.where(CommissioningDocument.version == version)
    doc = (await session.exec(
        query.order_by(col(CommissioningDocument.version).desc()).limit(1))).first()
    if doc is None:
        raise PlanNotFound(f"plan {plan_id} has no {kind} document"
                           + (f" version {version}" if version else ""))
    return doc


async def register_passed_units(session: AsyncSession, plan: CommissioningPlan, now: datetime
                                ) -> list[Unit]:
    """Every planned unit that passed joins the fleet under the name the site's agent gives
    its address (else its serial); a unit already known by that name or serial gets the
    nameplate."""
    report = await build(session, _pk(plan.id), now=now)
    units = []
    for u in report.units:
        if u.status != "pass" or not u.serial:
            continue
        name = u.device or u.serial
        row = (await session.exec(select(Unit).where(
            Unit.site_id == plan.site_id,
            (col(Unit.serial) == u.serial) | (col(Unit.device) == name)))).first()
        if row is None:
            row = Unit(site_id=plan.site_id, device=name, first_seen=now)
        row.series, row.model, row.serial = u.series, u.model, u.serial
        row.firmware = u.firmware
        session.add(row)
        units.append(row)
    await session.flush()
    return units
