"""Commissioning checks, pure: what a series must show before it joins the fleet, and verdicts.

Section 4 of the service terms: every unit a customer bought is commissioned (remotely or on
site) against a written plan. A profile's `[commissioning]` section (`CommissioningSpec`) says
what "commissioned" means for its series: the values that must lie within commissioning
ranges (tighter than the profile's valid ranges), the minimum insulation resistance, the
firmware the plan requires, the clock tolerance and the checks only a technician on site can
do. A plan turns that into `Requirements` (possibly overriding the firmware); the agent reads
a unit once and `evaluate_unit` gives one `CheckResult` per check, each with its evidence.
The same types carry on-site results, so a report can merge both.

Nothing here does I/O; the agent (agent/commissioning.py) and the server
(server/commissioning/) share these types through the `commissioning.check` command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocols.registers import Value

if TYPE_CHECKING:
    from protocols.profiles import Profile

MAX_UNIT_ID = 247


class Check(StrEnum):
    """The remote checks, in the order a report lists them."""

    COMMUNICATION = "communication"
    NAMEPLATE = "nameplate"
    RANGES = "values_in_range"
    ALARMS = "no_active_alarms"
    CLOCK = "clock_in_sync"
    FIRMWARE = "firmware"
    INSULATION = "insulation"


REMOTE_CHECKS: tuple[str, ...] = tuple(c.value for c in Check)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommissioningSpec(_Strict):
    """The `[commissioning]` section of a profile (see protocols/profiles/*.toml)."""

    type: str = Field(description="the equipment type as plans name it")
    firmware: str | None = Field(default=None, description="firmware a new unit must run")
    insulation_point: str = "emu.Riso"
    insulation_min_kohm: float = Field(gt=0)
    alarm_point: str = "emu.Alarm"
    clock_tolerance_s: float = Field(default=5.0, gt=0)
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    onsite: tuple[str, ...] = Field(
        default=(), description="checks only a technician on site can do (names)"
    )


class Requirements(_Strict):
    """What one series must show in one plan's run (a spec, with the plan's overrides)."""

    series: str
    firmware: str | None = None
    insulation_point: str = "emu.Riso"
    insulation_min_kohm: float
    alarm_point: str = "emu.Alarm"
    clock_tolerance_s: float = 5.0
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @classmethod
    def of(cls, profile: Profile, firmware: str | None = None) -> Requirements:
        """The profile's requirements; `firmware` overrides the required version."""
        spec = profile.commissioning
        if spec is None:
            raise ValueError(f"profile {profile.series} has no [commissioning] section")
        return cls(
            series=profile.series,
            firmware=firmware or spec.firmware,
            insulation_point=spec.insulation_point,
            insulation_min_kohm=spec.insulation_min_kohm,
            alarm_point=spec.alarm_point,
            clock_tolerance_s=spec.clock_tolerance_s,
            ranges=dict(spec.ranges),
        )


class CheckResult(_Strict):
    """One check of one unit: the verdict, a sentence saying why, and the evidence."""

    check: str
    passed: bool
    detail: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    source: Literal["remote", "onsite"] = "remote"


class Target(_Strict):
    """Where to look for units: one Modbus TCP address and unit-id ranges (`1-10,12`)."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\[\]-]+$")
    port: int = Field(default=502, ge=1, le=65535)
    unit_ids: str = "1-10"

    @field_validator("unit_ids")
    @classmethod
    def _ids(cls, value: str) -> str:
        parse_unit_ids(value)
        return value


class CheckRequest(_Strict):
    """The `commissioning.check` command's arguments."""

    plan_id: int = Field(ge=1)
    run_id: int | None = Field(default=None, ge=1)
    targets: tuple[Target, ...] = Field(min_length=1, max_length=64)
    requirements: dict[str, Requirements] = Field(description="by series")
    timeout_s: float = Field(default=1.0, gt=0, le=10)
    concurrency: int = Field(default=16, ge=1, le=64)


class UnitFinding(_Strict):
    """One unit the agent found, what it says it is, and its remote check results."""

    host: str
    port: int
    unit_id: int
    series: str | None
    device: str | None = Field(default=None, description="the agent's name for this address")
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    chain: tuple[int, ...] = ()
    checks: tuple[CheckResult, ...] = ()

    @property
    def address(self) -> str:
        """`host:port/unit`, for reports."""
        return f"{self.host}:{self.port}/{self.unit_id}"

    @property
    def passed(self) -> bool:
        """Whether every check passed (and there was at least one)."""
        return bool(self.checks) and all(c.passed for c in self.checks)


class CheckOutcome(_Strict):
    """The agent's answer to `commissioning.check`: what it found, and its clock."""

    plan_id: int
    run_id: int | None = None
    started_at: datetime
    finished_at: datetime
    agent_time: datetime = Field(description="the gateway's clock when the answer was made")
    probed: int = Field(ge=0, description="addresses probed")
    units: tuple[UnitFinding, ...] = ()
    notes: tuple[str, ...] = ()


def parse_unit_ids(text: str) -> list[int]:
    """`"1-5,7"` -> [1, 2, 3, 4, 5, 7]; ValueError for anything outside 1..247."""
    ids: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo_text, _, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if hi_text else lo
        except ValueError:
            raise ValueError(f"unit ids: {part!r} is not a number or a range a-b") from None
        if not 1 <= lo <= hi <= MAX_UNIT_ID:
            raise ValueError(f"unit ids: {part!r} is outside 1..{MAX_UNIT_ID} or backwards")
        ids.update(range(lo, hi + 1))
    if not ids:
        raise ValueError("unit ids: none given")
    return sorted(ids)


def _num(value: Value | None) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def check_communication(reads: int, failed: int, error: str | None) -> CheckResult:
    """Every read of one full pass answered."""
    ok = reads > 0 and failed == 0
    detail = (f"all {reads} reads answered" if ok
              else f"{failed} of {reads} reads failed" + (f": {error}" if error else ""))
    return CheckResult(check=Check.COMMUNICATION, passed=ok, detail=detail,
                       evidence={"reads": reads, "failed": failed, "last_error": error})


def check_nameplate(profile: Profile, values: Mapping[str, Value | None],
                    chain: Sequence[int]) -> CheckResult:
    """The unit names a model of a known series, has a serial, and carries its SunSpec chain."""
    expected = [m.id for m in profile.models]
    evidence = {
        "manufacturer": values.get("common.Mn"), "model": values.get("common.Md"),
        "serial": values.get("common.SN"), "version": values.get("common.Vr"),
        "chain": list(chain), "profile_chain": expected,
    }
    problems = []
    if not values.get("common.SN"):
        problems.append("no serial number")
    if list(chain) != expected:
        problems.append(f"SunSpec models {list(chain)} differ from the profile's {expected}")
    detail = "; ".join(problems) or (
        f"{values.get('common.Mn')} {values.get('common.Md')} serial {values.get('common.SN')}")
    return CheckResult(check=Check.NAMEPLATE, passed=not problems, detail=detail,
                       evidence=evidence)


def check_ranges(values: Mapping[str, Value | None],
                 ranges: Mapping[str, tuple[float, float]]) -> CheckResult:
    """Each commissioning-range point was read and lies within its range."""
    seen: dict[str, Any] = {}
    bad = []
    for point, (lo, hi) in sorted(ranges.items()):
        value = _num(values.get(point))
        seen[point] = {"value": value, "min": lo, "max": hi}
        if value is None or not lo <= value <= hi:
            bad.append(f"{point}={'not read' if value is None else round(value, 3)} "
                       f"outside {lo}..{hi}")
    detail = "; ".join(bad) or f"{len(ranges)} values within their commissioning ranges"
    return CheckResult(check=Check.RANGES, passed=not bad, detail=detail, evidence=seen)


def check_alarms(profile: Profile, values: Mapping[str, Value | None], point: str) -> CheckResult:
    """No alarm bit is set."""
    raw = values.get(point)
    if not isinstance(raw, int):
        return CheckResult(check=Check.ALARMS, passed=False, detail=f"{point} not read",
                           evidence={"point": point, "raw": raw})
    symbols = profile.point(point).symbol_map() if raw else {}
    active = sorted(symbols.get(bit, f"bit{bit}") for bit in range(32) if raw >> bit & 1)
    detail = f"active alarms: {', '.join(active)}" if active else "no active alarms"
    return CheckResult(check=Check.ALARMS, passed=not active, detail=detail,
                       evidence={"point": point, "raw": raw, "active": active})


def check_firmware(values: Mapping[str, Value | None], required: str | None) -> CheckResult:
    """The unit runs the firmware the plan requires (exactly: commissioning fixes a baseline)."""
    running = values.get("emu.FwVer") or values.get("common.Vr")
    evidence = {"running": running, "required": required}
    if required is None:
        return CheckResult(check=Check.FIRMWARE, passed=running is not None,
                           detail=f"running {running}; no version required", evidence=evidence)
    ok = str(running) == required
    detail = f"running {running}" + ("" if ok else f", plan requires {required}")
    return CheckResult(check=Check.FIRMWARE, passed=ok, detail=detail, evidence=evidence)


def check_insulation(values: Mapping[str, Value | None], point: str,
                     minimum_kohm: float) -> CheckResult:
    """Insulation resistance at or above the series' minimum."""
    value = _num(values.get(point))
    ok = value is not None and value >= minimum_kohm
    shown = "not read" if value is None else f"{value:g} kOhm"
    detail = f"{shown}, minimum {minimum_kohm:g} kOhm"
    return CheckResult(check=Check.INSULATION, passed=ok, detail=detail,
                       evidence={"point": point, "kohm": value, "minimum_kohm": minimum_kohm})


def check_clock(agent_time: datetime, reference: datetime, tolerance_s: float) -> CheckResult:
    """The gateway's clock, which stamps every reading of the site, agrees with the server's."""
    skew = (agent_time - reference).total_seconds()
    ok = abs(skew) <= tolerance_s
    return CheckResult(
        check=Check.CLOCK, passed=ok,
        detail=f"gateway clock {skew:+.1f} s from the server's (tolerance {tolerance_s:g} s)",
        evidence={"agent_time": agent_time.isoformat(), "server_time": reference.isoformat(),
                  "skew_s": round(skew, 3), "tolerance_s": tolerance_s},
    )


def evaluate_unit(
    profile: Profile,
    values: Mapping[str, Value | None],
    requirements: Requirements,
    *,
    chain: Sequence[int],
    reads: int,
    failed: int,
    error: str | None = None,
) -> list[CheckResult]:
    """The remote checks a unit's one full read allows (the clock is judged by the server,
    which holds the reference time)."""
    return [
        check_communication(reads, failed, error),
        check_nameplate(profile, values, chain),
        check_ranges(values, requirements.ranges),
        check_alarms(profile, values, requirements.alarm_point),
        check_firmware(values, requirements.firmware),
        check_insulation(values, requirements.insulation_point,
                         requirements.insulation_min_kohm),
    ]
