"""Faults a simulated unit can be told to have, by name.

Each fault changes what the unit reports (values, status, alarm and event bits) and/or how
it answers (not at all, late, or with Modbus exceptions). Several can be active at once;
their effects combine. The names are a contract for tests and for `emu sim inject`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from simulators.errors import UnknownFaultError


@dataclass(frozen=True, slots=True)
class Effects:
    """What the active faults do to one unit, combined."""

    temp_offset: float = 0.0
    riso_kohm: float | None = None
    grid_lost: bool = False
    tripped: bool = False
    derate_pct: float | None = None
    soc_override: float | None = None
    alarms: frozenset[str] = frozenset()
    warnings: frozenset[str] = frozenset()
    inverter_events: frozenset[str] = frozenset()
    battery_events: frozenset[str] = frozenset()
    silent: bool = False
    delay_s: float = 0.0
    error_rate: float = 0.0

    def merge(self, other: Effects) -> Effects:
        """Both sets of effects at once (the worse value wins)."""
        return Effects(
            temp_offset=self.temp_offset + other.temp_offset,
            riso_kohm=_min_opt(self.riso_kohm, other.riso_kohm),
            grid_lost=self.grid_lost or other.grid_lost,
            tripped=self.tripped or other.tripped,
            derate_pct=_min_opt(self.derate_pct, other.derate_pct),
            soc_override=_min_opt(self.soc_override, other.soc_override),
            alarms=self.alarms | other.alarms,
            warnings=self.warnings | other.warnings,
            inverter_events=self.inverter_events | other.inverter_events,
            battery_events=self.battery_events | other.battery_events,
            silent=self.silent or other.silent,
            delay_s=max(self.delay_s, other.delay_s),
            error_rate=max(self.error_rate, other.error_rate),
        )


def _min_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """A named fault: what it means and what it does; `params` are its tunable defaults."""

    name: str
    description: str
    effects: Effects
    params: Mapping[str, float] = field(default_factory=dict)

    def with_params(self, params: Mapping[str, float]) -> Effects:
        """The effects, with tunable parameters applied."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise UnknownFaultError(
                f"fault {self.name} has no parameter {', '.join(sorted(unknown))}; "
                f"it takes: {', '.join(sorted(self.params)) or 'none'}"
            )
        p = {**self.params, **params}
        eff = self.effects
        if "delay_s" in p:
            eff = replace(eff, delay_s=float(p["delay_s"]))
        if "rate" in p:
            if not 0.0 <= p["rate"] <= 1.0:
                raise UnknownFaultError(f"fault {self.name}: rate must be within 0..1")
            eff = replace(eff, error_rate=float(p["rate"]))
        if "limit_pct" in p:
            eff = replace(eff, derate_pct=float(p["limit_pct"]))
        if "offset_c" in p:
            eff = replace(eff, temp_offset=float(p["offset_c"]))
        if "kohm" in p:
            eff = replace(eff, riso_kohm=float(p["kohm"]))
        return eff


def _fs(*names: str) -> frozenset[str]:
    return frozenset(names)


FAULTS: dict[str, FaultSpec] = {
    f.name: f
    for f in (
        FaultSpec(
            "over_temperature",
            "cabinet and internal temperatures rise by offset_c; over-temperature alarm",
            Effects(
                temp_offset=45.0,
                alarms=_fs("OVER_TEMPERATURE"),
                warnings=_fs("TEMPERATURE_HIGH"),
                inverter_events=_fs("OVER_TEMP"),
                battery_events=_fs("OVER_TEMP_ALARM"),
            ),
            {"offset_c": 45.0},
        ),
        FaultSpec(
            "insulation_low",
            "insulation resistance drops to kohm; ground-fault alarm",
            Effects(
                riso_kohm=40.0,
                alarms=_fs("INSULATION_LOW"),
                warnings=_fs("INSULATION_DEGRADED"),
                inverter_events=_fs("GROUND_FAULT"),
            ),
            {"kohm": 40.0},
        ),
        FaultSpec(
            "grid_loss",
            "the grid is gone: no AC voltage or frequency, no output",
            Effects(
                grid_lost=True, alarms=_fs("GRID_LOSS"), inverter_events=_fs("GRID_DISCONNECT")
            ),
        ),
        FaultSpec(
            "trip",
            "the unit tripped: output zero, inverter state FAULT",
            Effects(tripped=True, alarms=_fs("TRIP"), inverter_events=_fs("MANUAL_SHUTDOWN")),
        ),
        FaultSpec(
            "derating",
            "output limited to limit_pct of rated power",
            Effects(derate_pct=30.0, alarms=_fs("DERATING"), warnings=_fs("EFFICIENCY_LOW")),
            {"limit_pct": 30.0},
        ),
        FaultSpec(
            "soc_low",
            "battery state of charge below its reserve",
            Effects(
                soc_override=4.0,
                alarms=_fs("SOC_RESERVE_LOW"),
                warnings=_fs("SOC_LOW"),
                battery_events=_fs("UNDER_SOC_MIN_ALARM"),
            ),
        ),
        FaultSpec(
            "comm_loss",
            "the unit stops answering Modbus requests and stops publishing",
            Effects(silent=True),
        ),
        FaultSpec(
            "intermittent_comms",
            "a share (rate) of requests time out or get a Modbus exception",
            Effects(error_rate=0.3),
            {"rate": 0.3},
        ),
        FaultSpec(
            "slow_response",
            "every answer is delayed by delay_s (keep it below the poller's timeout)",
            Effects(delay_s=0.4),
            {"delay_s": 0.4},
        ),
    )
}


def fault(name: str) -> FaultSpec:
    """A fault by name; the error lists the known ones."""
    try:
        return FAULTS[name]
    except KeyError:
        raise UnknownFaultError(
            f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}"
        ) from None


def combine(active: Iterable[Effects]) -> Effects:
    """The combined effect of several faults."""
    out = Effects()
    for eff in active:
        out = out.merge(eff)
    return out
