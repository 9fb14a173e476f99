"""The commissioning report: the plan's equipment against what was found, check by check.

Pure: `build_report` takes the plan, the agent's latest `CheckOutcome` (with the time the
server received it, the reference for the clock check) and the technicians' on-site results,
and returns a `Report`. Units are identified by serial: remote findings and on-site results
of one serial merge into one row. Matching per series: listed serials are matched by serial;
unlisted places (count above the serials listed) take the remaining units of that series in
address order; planned units not found are *missing*; units found but not planned (or of a
series the plan does not have) are *unexpected*. A unit *passes* when every check of its
series' checklist has a result and all results pass; a check without a result leaves it
*incomplete*.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from protocols.commissioning import Check, CheckOutcome, CheckResult, UnitFinding, check_clock

Status = Literal["pass", "fail", "incomplete"]


class ReportCheck(BaseModel):
    """One check of one unit in the report."""

    check: str
    source: str
    passed: bool
    detail: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    recorded_by: str | None = None
    recorded_at: datetime | None = None


class ReportUnit(BaseModel):
    """One unit: identity, where it answered, its checks and its status."""

    serial: str | None
    series: str | None
    device: str | None = None
    model: str | None = None
    firmware: str | None = None
    address: str | None = None
    planned: bool = True
    status: Status = "incomplete"
    pending: list[str] = Field(default_factory=list)
    checks: list[ReportCheck] = Field(default_factory=list)


class Missing(BaseModel):
    """A planned unit that was not found."""

    series: str
    serial: str | None
    detail: str


class Summary(BaseModel):
    """Counts and the verdict."""

    planned: int
    found: int
    passed: int
    failed: int
    incomplete: int
    missing: int
    unexpected: int
    verdict: Status


class Report(BaseModel):
    """The whole report, as the JSON download gives it and the templates render it."""

    plan_id: int
    plan_version: int
    title: str
    customer: str
    site: dict[str, str]
    mode: str
    generated_at: datetime
    summary: Summary
    units: list[ReportUnit]
    missing: list[Missing]
    unexpected: list[ReportUnit]
    remote_run: dict[str, Any] | None = None
    notes: list[str] = Field(default_factory=list)


class OnsiteEntry(BaseModel):
    """An on-site result as the report needs it (from an `OnsiteResult` row)."""

    serial: str
    series: str | None
    check: str
    passed: bool
    detail: str
    evidence: dict[str, Any]
    technician: str
    recorded_at: datetime


def _unit_from_finding(u: UnitFinding, clock: CheckResult | None) -> ReportUnit:
    checks = [ReportCheck(source="remote", **c.model_dump(exclude={"source"})) for c in u.checks]
    if clock is not None:
        checks.append(ReportCheck(source="remote", **clock.model_dump(exclude={"source"})))
    return ReportUnit(serial=u.serial, series=u.series, device=u.device, model=u.model,
                      firmware=u.firmware, address=u.address, checks=checks)


def _merge_onsite(units: dict[str, ReportUnit], onsite: Sequence[OnsiteEntry]) -> None:
    latest: dict[tuple[str, str], OnsiteEntry] = {}
    for r in sorted(onsite, key=lambda r: r.recorded_at):
        latest[(r.serial, r.check)] = r
    for (serial, check), r in latest.items():
        unit = units.get(serial)
        if unit is None:
            unit = units[serial] = ReportUnit(serial=serial, series=r.series)
        elif unit.series is None:
            unit.series = r.series
        unit.checks = [c for c in unit.checks if not (c.check == check and c.source == "onsite")]
        unit.checks.append(ReportCheck(
            check=check, source="onsite", passed=r.passed, detail=r.detail, evidence=r.evidence,
            recorded_by=r.technician, recorded_at=r.recorded_at))


def _status(unit: ReportUnit, required: Sequence[str]) -> None:
    have = {c.check for c in unit.checks}
    unit.pending = [name for name in required if name not in have]
    if any(not c.passed for c in unit.checks):
        unit.status = "fail"
    elif unit.pending or not unit.checks:
        unit.status = "incomplete"
    else:
        unit.status = "pass"
    order = {name: i for i, name in enumerate(required)}
    unit.checks.sort(key=lambda c: (order.get(c.check, len(order)), c.source))


def _match(
    equipment: Sequence[dict[str, Any]], units: list[ReportUnit]
) -> tuple[list[ReportUnit], list[Missing], list[ReportUnit]]:
    """(planned units found, missing, unexpected)."""
    pool = sorted(units, key=lambda u: (u.address or "~", u.serial or ""))
    matched: list[ReportUnit] = []
    missing: list[Missing] = []
    for item in equipment:
        series, serials = item["series"], list(item.get("serials") or [])
        of_series = [u for u in pool if u.series == series]
        for serial in serials:
            hit = next((u for u in of_series if u.serial == serial), None)
            if hit is None:
                missing.append(Missing(series=series, serial=serial,
                                       detail=f"{series} serial {serial} is in the plan but "
                                              "was not found on site"))
            else:
                matched.append(hit)
                pool.remove(hit)
        listed = set(serials)
        free = [u for u in pool if u.series == series and u.serial not in listed]
        places = max(int(item.get("count", len(serials))) - len(serials), 0)
        for u in free[:places]:
            matched.append(u)
            pool.remove(u)
        short = places - min(places, len(free))
        if short:
            missing.append(Missing(series=series, serial=None,
                                   detail=f"{short} more {series} unit(s) planned than found"))
    for u in pool:
        u.planned = False
    return matched, missing, pool


def build_report(
    *,
    plan_id: int,
    plan_version: int,
    title: str,
    customer: str,
    site: dict[str, str],
    mode: str,
    equipment: Sequence[dict[str, Any]],
    checklist: dict[str, list[dict[str, str]]],
    clock_tolerance_s: dict[str, float],
    outcome: CheckOutcome | None,
    received_at: datetime | None,
    run_id: int | None,
    onsite: Sequence[OnsiteEntry],
    now: datetime,
) -> Report:
    """The report of a plan from its latest remote outcome and all on-site results."""
    units: dict[str, ReportUnit] = {}
    anonymous: list[ReportUnit] = []
    notes: list[str] = []
    remote: dict[str, Any] | None = None
    if outcome is not None:
        reference = received_at or outcome.finished_at
        for f in outcome.units:
            tol = clock_tolerance_s.get(f.series or "", 5.0)
            clock = check_clock(outcome.agent_time, reference, tol) if f.series else None
            unit = _unit_from_finding(f, clock)
            if f.serial:
                units[f.serial] = unit
            else:
                anonymous.append(unit)
        notes.extend(outcome.notes)
        remote = {"run_id": run_id, "started_at": outcome.started_at.isoformat(),
                  "finished_at": outcome.finished_at.isoformat(), "probed": outcome.probed,
                  "found": len(outcome.units)}
    _merge_onsite(units, onsite)
    everyone = [*units.values(), *anonymous]
    for unit in everyone:
        items = checklist.get(unit.series or "", [])
        required = [i["name"] for i in items] or [str(c) for c in Check]
        _status(unit, required)
    matched, missing, unexpected = _match(equipment, everyone)
    planned = sum(int(i.get("count", len(i.get("serials") or []))) for i in equipment)
    counts = {s: sum(1 for u in matched if u.status == s) for s in ("pass", "fail", "incomplete")}
    if counts["fail"] or missing:
        verdict: Status = "fail"
    elif counts["incomplete"] or len(matched) < planned:
        verdict = "incomplete"
    else:
        verdict = "pass"
    summary = Summary(planned=planned, found=len(matched) + len(unexpected),
                      passed=counts["pass"], failed=counts["fail"],
                      incomplete=counts["incomplete"], missing=len(missing),
                      unexpected=len(unexpected), verdict=verdict)
    return Report(plan_id=plan_id, plan_version=plan_version, title=title, customer=customer,
                  site=site, mode=mode, generated_at=now, summary=summary, units=matched,
                  missing=missing, unexpected=unexpected, remote_run=remote, notes=notes)
