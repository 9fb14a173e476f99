"""The pure core of the fault engine: condition monitors and one state machine per (unit, rule).

Nothing here touches the database or a clock. The engine feeds observations in — a poll
cycle's samples (`Cycle`), an agent's `Event`, or the passing of wall time (`Tick`, only for
communication loss, which is the absence of data) — and applies the transitions that come out:
`Opened`, `Escalated`, `Seen`, `ClearingStarted`, `ClearingCancelled`, `Cleared`.

Time is the observations' own timestamps, so replaying the same data gives the same result.
A machine ignores observations older than its `horizon` (what the database already records
for that unit and code), so old data never re-opens a fault that was cleared after it.

    idle --any trigger held for for_s--> open --any escalation held--> open (worse class)
    open --no trigger true (some known false)--> clearing --clear_hold_s--> idle (cleared)
    clearing --a trigger true again--> open
"""

from __future__ import annotations

import bisect
import operator
import statistics
from collections import Counter, deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from protocols.fault_rules import (
    AlarmBitCondition,
    AnyCondition,
    AnyRule,
    Catalog,
    CommLossCondition,
    FlappingCondition,
    RateCondition,
    ThresholdCondition,
    worse,
)
from protocols.messages import Event, EventKind, PointValue, Quality, TelemetryPoint

READABLE = (Quality.GOOD, Quality.OUT_OF_RANGE)  # read from the unit this cycle
EVIDENCE_SAMPLES = 5  # recent samples a monitor keeps for a fault's evidence
EVIDENCE_OCCURRENCES = 20
GAP_FACTOR = 1.5  # a delta this many poll intervals long means a cycle was missed
INTERVAL_HISTORY = 9  # deltas the poll-interval estimate is the median of
_OPS: Mapping[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
}


def iso(ts: datetime) -> str:
    """UTC ISO-8601 with `Z`, as evidence stores times."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


_CONDITION_TYPES = (ThresholdCondition, RateCondition, FlappingCondition, AlarmBitCondition,
                    CommLossCondition)


def condition_dict(cond: AnyCondition) -> dict[str, Any]:
    """A condition as JSON: its own keys only (a rule is also its own first condition)."""
    for kind in _CONDITION_TYPES:
        if isinstance(cond, kind):
            keys = set(kind.model_fields)
            data = cond.model_dump(mode="json", by_alias=True, exclude_defaults=True)
            return {k: v for k, v in data.items() if k in keys}
    raise TypeError(f"not a condition: {cond!r}")


# --- observations ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cycle:
    """One poll cycle of one unit: its samples sharing one timestamp.

    `values` holds the watched points read this cycle (good or out of range), `qualities` the
    watched points' qualities, `counts` the qualities of every sample.
    """

    ts: datetime
    values: Mapping[str, PointValue]
    qualities: Mapping[str, Quality]
    counts: Mapping[Quality, int]

    @property
    def lost(self) -> bool:
        """Every sample says comm_lost (what the agent sends when it loses the unit)."""
        total = sum(self.counts.values())
        return total > 0 and self.counts.get(Quality.COMM_LOST, 0) == total

    @property
    def alive(self) -> bool:
        """Something was read from the unit."""
        return any(self.counts.get(q, 0) for q in READABLE)


@dataclass(frozen=True, slots=True)
class Tick:
    """Wall time passed, for conditions that are the absence of data.

    `quiet_s` is how long the unit has been silent as the engine judges it (the server's clock,
    or, while its agent is online, how far its site's data is ahead of its own): a gateway
    whose clock is off, or data that is late, must not make its units look silent. Without
    it, the time since the last sample's timestamp is used.
    """

    now: datetime
    quiet_s: float | None = None


Observation: TypeAlias = Cycle | Event | Tick


def build_cycles(points: Iterable[TelemetryPoint], watched: Container[str]) -> list[Cycle]:
    """Group one unit's samples into cycles by timestamp, oldest first.

    Runs once per reading: a cycle's samples usually follow each other and share one
    timestamp object, so the slot is looked up only when the timestamp changes, and the
    qualities are counted in one go at the end.
    """
    by_ts: dict[datetime, tuple[dict[str, PointValue], dict[str, Quality], list[Quality]]] = {}
    last: datetime | None = None
    values: dict[str, PointValue] = {}
    qualities: dict[str, Quality] = {}
    seen: list[Quality] = []
    for p in points:
        ts = p.ts
        if ts is not last:
            slot = by_ts.get(ts)
            if slot is None:
                slot = by_ts[ts] = ({}, {}, [])
            values, qualities, seen = slot
            last = ts
        quality = p.quality
        seen.append(quality)
        if p.point in watched:
            qualities[p.point] = quality
            if quality in READABLE and p.value is not None:
                values[p.point] = p.value
    return [Cycle(ts, v, q, Counter(c)) for ts, (v, q, c) in sorted(by_ts.items())]


def _number(value: PointValue) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


# --- monitors ----------------------------------------------------------------------------


class Monitor:
    """The live state of one condition for one unit.

    `truth()` is the raw state after the last observation (None: unknown yet);
    `held(at)` whether it has been true for the condition's `for_s` at `at`.
    """

    timed = False  # whether wall time alone (a Tick) can change it

    def __init__(self, cond: AnyCondition) -> None:
        self.cond = cond
        self.since: datetime | None = None
        self.latest: datetime | None = None
        self._truth: bool | None = None

    def cycle(self, c: Cycle) -> None:
        """Observe a poll cycle."""

    def event(self, e: Event) -> None:
        """Observe an event of the unit."""

    def time(self, tick: Tick) -> None:
        """Observe that wall time passed."""

    def truth(self) -> bool | None:
        """Raw state after the last observation."""
        return self._truth

    def held(self, at: datetime, *, tick: bool = False) -> bool:
        """True for at least `for_s` at `at` (on a tick, `at` is the server's wall time)."""
        return (
            self._truth is True
            and self.since is not None
            and (at - self.since).total_seconds() >= self.cond.for_s
        )

    def held_at(self) -> datetime | None:
        """When it became held (true since + for_s), if it is true."""
        if self._truth is not True or self.since is None:
            return None
        return self.since + timedelta(seconds=self.cond.for_s)

    def evidence(self) -> dict[str, Any]:
        """What made it true, as JSON."""
        out = condition_dict(self.cond)
        if self.since is not None:
            out["since"] = iso(self.since)
        return out

    def _set(self, truth: bool | None, ts: datetime) -> None:
        if self.latest is None or ts > self.latest:
            self.latest = ts
        if truth is None:
            return
        if truth and (self._truth is not True or self.since is None):
            self.since = ts
        elif not truth:
            self.since = None
        self._truth = truth


class _PointMonitor(Monitor):
    """A monitor of one point that keeps its last few samples as evidence."""

    point: str

    def __init__(self, cond: AnyCondition, point: str) -> None:
        super().__init__(cond)
        self.point = point
        self.samples: deque[tuple[datetime, PointValue, Quality]] = deque(maxlen=EVIDENCE_SAMPLES)

    def _read(self, c: Cycle) -> PointValue:
        quality = c.qualities.get(self.point)
        if quality is None:
            return None
        value = c.values.get(self.point)
        if not self.samples or self.samples[-1][0] != c.ts:
            self.samples.append((c.ts, value, quality))
        return value

    def evidence(self) -> dict[str, Any]:
        """The condition and the point's recent samples."""
        out = super().evidence()
        out["samples"] = [{"ts": iso(ts), "value": v, "quality": q.value}
                          for ts, v, q in self.samples]
        return out


class ThresholdMonitor(_PointMonitor):
    """`point op value`."""

    def __init__(self, cond: ThresholdCondition, catalog: Catalog) -> None:
        super().__init__(cond, cond.point)
        self.op = _OPS[cond.op]
        limit = cond.value
        self.limit = float(catalog.symbol(cond.point, limit) if isinstance(limit, str) else limit)

    def cycle(self, c: Cycle) -> None:
        """Compare the point's value, if it was read."""
        value = _number(self._read(c))
        self._set(None if value is None else self.op(value, self.limit), c.ts)


class AlarmBitMonitor(_PointMonitor):
    """A named bit of a bitfield point."""

    def __init__(self, cond: AlarmBitCondition, catalog: Catalog) -> None:
        super().__init__(cond, cond.point)
        self.mask = 1 << catalog.bit(cond.point, cond.bit)

    def cycle(self, c: Cycle) -> None:
        """Test the bit, if the point was read."""
        value = self._read(c)
        truth = bool(value & self.mask) if isinstance(value, int) else None
        self._set(truth, c.ts)


class RateMonitor(_PointMonitor):
    """Change per minute over the window (oldest sample in the window against the newest)."""

    def __init__(self, cond: RateCondition) -> None:
        super().__init__(cond, cond.point)
        self.rc = cond
        self.window = timedelta(seconds=cond.window_s)
        self.series: deque[tuple[datetime, float]] = deque()
        self.rate: float | None = None

    def cycle(self, c: Cycle) -> None:
        """Add the sample and recompute the rate once the window is half full."""
        value = _number(self._read(c))
        if value is None:
            self._set(None, c.ts)
            return
        cond = self.rc
        if self.series and self.series[-1][0] == c.ts:
            self.series.pop()
        self.series.append((c.ts, value))
        while self.series[0][0] < c.ts - self.window:
            self.series.popleft()
        t0, v0 = self.series[0]
        span = (c.ts - t0).total_seconds()
        if span < cond.window_s / 2:
            self._set(None, c.ts)
            return
        self.rate = (value - v0) / span * 60.0
        beyond = {"rise": self.rate > cond.limit, "fall": -self.rate > cond.limit,
                  "either": abs(self.rate) > cond.limit}[cond.direction]
        self._set(beyond, c.ts)

    def evidence(self) -> dict[str, Any]:
        """The condition, the rate per minute and the samples."""
        out = super().evidence()
        if self.rate is not None:
            out["rate_per_min"] = round(self.rate, 3)
        return out


class FlappingMonitor(Monitor):
    """Occurrences within a window: value changes, degraded cycles, or events.

    A monitor that has not yet watched a whole window cannot say "false" (a restarted server
    must not clear a flapping fault because its count started again from zero).
    """

    def __init__(self, cond: FlappingCondition, catalog: Catalog) -> None:
        super().__init__(cond)
        self.fc = cond
        self.window = timedelta(seconds=cond.window_s)
        self.occurrences: list[datetime] = []
        self.first: datetime | None = None
        self.mask = catalog.bit(cond.point, cond.bit) if cond.point and cond.bit else None
        self._prev: tuple[datetime, PointValue] | None = None
        self._cycles: deque[datetime] = deque(maxlen=INTERVAL_HISTORY + 1)
        self._bad_qualities = frozenset(cond.qualities)
        self._prev_lost = False

    def _occur(self, ts: datetime) -> None:
        i = bisect.bisect_left(self.occurrences, ts)
        if i == len(self.occurrences) or self.occurrences[i] != ts:
            self.occurrences.insert(i, ts)

    def _recount(self, ts: datetime) -> None:
        if self.first is None or ts < self.first:
            self.first = ts
        latest = max(ts, self.latest or ts)
        del self.occurrences[: bisect.bisect_right(self.occurrences, latest - self.window)]
        if len(self.occurrences) >= self.fc.count:
            truth: bool | None = True
        elif self._truth is True or latest - self.first >= self.window:
            truth = False  # it was seen true, or a whole window was watched
        else:
            truth = None
        self._set(truth, ts)

    def cycle(self, c: Cycle) -> None:
        """Count a change of the watched value, or a degraded or missed cycle."""
        signal = self.fc.signal
        if signal == "value":
            self._value(c)
        elif signal == "quality":
            self._quality(c)
        self._recount(c.ts)

    def _value(self, c: Cycle) -> None:
        value = c.values.get(self.fc.point or "")
        if value is None:
            return
        if self.mask is not None and isinstance(value, int):
            value = value >> self.mask & 1
        prev = self._prev
        if prev is not None and c.ts > prev[0] and value != prev[1]:
            self._occur(c.ts)
        if prev is None or c.ts >= prev[0]:
            self._prev = (c.ts, value)

    def _quality(self, c: Cycle) -> None:
        point = self.fc.point
        if point is not None:
            bad = c.qualities.get(point) in self._bad_qualities
        else:
            bad = any(c.counts.get(q, 0) for q in self._bad_qualities)
        if bad:
            self._occur(c.ts)
        if self.fc.gaps:
            newest = not self._cycles or c.ts > self._cycles[-1]
            missed = self._missed_slot(c.ts)
            if missed is not None and not (c.lost or self._prev_lost):
                self._occur(missed)  # a gap around a reported loss is that loss, not a flap
            if newest:
                self._prev_lost = c.lost

    def _missed_slot(self, ts: datetime) -> datetime | None:
        """The first missed slot before `ts`, if the gap since the last cycle is too long."""
        cycles = self._cycles
        if cycles and ts <= cycles[-1]:
            return None
        cycles.append(ts)
        deltas = [(b - a).total_seconds() for a, b in zip(cycles, list(cycles)[1:], strict=False)]
        if len(deltas) < 4:
            return None
        interval = statistics.median(deltas[:-1])
        if interval <= 0 or deltas[-1] <= GAP_FACTOR * interval:
            return None
        return cycles[-2] + timedelta(seconds=interval)

    def event(self, e: Event) -> None:
        """Count an event of the watched kinds (and codes)."""
        fc = self.fc
        if fc.signal == "events" and e.kind in fc.events and (not fc.codes or e.code in fc.codes):
            self._occur(e.ts)
        self._recount(e.ts)

    def evidence(self) -> dict[str, Any]:
        """The condition, the count and the latest occurrences."""
        out = super().evidence()
        out["occurrences"] = len(self.occurrences)
        out["at"] = [iso(t) for t in self.occurrences[-EVIDENCE_OCCURRENCES:]]
        return out


class CommLossMonitor(Monitor):
    """The unit cannot be reached: reported lost (for `for_s`), or silent for `silence_s`.

    Lost from a comm_lost event or a cycle of comm_lost samples; back from a comm_restored
    event or any cycle with a value read. A loss reported for a time before the last sign of
    life is over already and ignored (events and telemetry travel apart). Whether a loss has
    lasted is decided by the server's clock (`Tick.quiet_s`); when it began is recorded in the
    samples' time, like every other fault time.
    """

    timed = True

    def __init__(self, cond: CommLossCondition, alive_hint: datetime | None = None) -> None:
        super().__init__(cond)
        self.cc = cond
        self.lost_at: datetime | None = None
        self.lost_by: str | None = None
        self.alive_at = alive_hint
        self.quiet_s: float | None = None
        self.detail: dict[str, Any] = {}

    def truth(self) -> bool | None:
        """Lost (True), back (False), or never heard of (None)."""
        if self.lost_at is not None:
            return True
        return False if self.alive_at is not None else None

    def held_at(self) -> datetime | None:
        """When the loss counted: at once for silence, else `for_s` after it was reported."""
        if self.lost_at is None:
            return None
        return self.lost_at + timedelta(seconds=0 if self.lost_by == "silence" else self.cc.for_s)

    def held(self, at: datetime, *, tick: bool = False) -> bool:
        """Silence counts at once; a reported loss once it lasted `for_s`."""
        start = self.held_at()
        if start is None:
            return False
        if self.lost_by == "silence" or (not tick and at >= start):
            return True
        if not tick or self.lost_at is None:
            return False
        lasted = self.quiet_s if self.quiet_s is not None else (at - self.lost_at).total_seconds()
        return lasted >= self.cc.for_s

    def _lost(self, ts: datetime, by: str, detail: Mapping[str, Any]) -> None:
        if self.alive_at is not None and ts < self.alive_at:
            return
        if self.lost_at is None or (by == "event" and self.lost_by == "samples"):
            self.lost_at = self.since = min(ts, self.lost_at or ts)
            self.lost_by, self.detail = by, dict(detail)  # the event says more: keep that

    def _alive(self, ts: datetime) -> None:
        if self.lost_at is not None and ts <= self.lost_at:
            return
        self.lost_at = self.lost_by = None
        self.since = None
        if self.alive_at is None or ts > self.alive_at:
            self.alive_at = ts

    def cycle(self, c: Cycle) -> None:
        """A cycle of comm_lost samples is a loss; a value read is a sign of life."""
        self.latest = max(c.ts, self.latest or c.ts)
        self.quiet_s = 0.0
        if c.lost and self.cc.events:
            self._lost(c.ts, "samples", {})
        elif c.alive:
            self._alive(c.ts)

    def event(self, e: Event) -> None:
        """comm_lost and comm_restored from the agent."""
        if not self.cc.events:
            return
        if e.kind is EventKind.COMM_LOST:
            self._lost(e.ts, "event", {"event": e.model_dump(mode="json")})
        elif e.kind is EventKind.COMM_RESTORED:
            self._alive(e.ts)

    def time(self, tick: Tick) -> None:
        """Silence: nothing heard for `silence_s` (recorded from the last sample's time)."""
        self.quiet_s = quiet = tick.quiet_s
        if quiet is None and self.alive_at is not None:
            quiet = (tick.now - self.alive_at).total_seconds()
        silence = self.cc.silence_s
        if not silence or self.lost_at is not None or self.alive_at is None:
            return
        if quiet is not None and quiet >= silence:
            self.lost_at = self.since = self.alive_at + timedelta(seconds=silence)
            self.latest = max(self.lost_at, self.latest or self.lost_at)
            self.lost_by = "silence"
            self.detail = {"last_data": iso(self.alive_at), "silent_s": round(quiet, 1)}

    def evidence(self) -> dict[str, Any]:
        """How the loss was seen."""
        out = super().evidence()
        out.update({"lost_by": self.lost_by, **self.detail})
        if self.lost_at is not None:
            out["lost_at"] = iso(self.lost_at)
        return out


def monitor(cond: AnyCondition, catalog: Catalog, alive_hint: datetime | None = None) -> Monitor:
    """The monitor for a condition."""
    if isinstance(cond, ThresholdCondition):
        return ThresholdMonitor(cond, catalog)
    if isinstance(cond, AlarmBitCondition):
        return AlarmBitMonitor(cond, catalog)
    if isinstance(cond, RateCondition):
        return RateMonitor(cond)
    if isinstance(cond, FlappingCondition):
        return FlappingMonitor(cond, catalog)
    return CommLossMonitor(cond, alive_hint)


# --- transitions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    """Open a fault at `ts` with this class (already escalated if `escalated_from`)."""

    ts: datetime
    fault_class: str
    title: str
    escalated_from: str | None
    evidence: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Escalated:
    """Raise the open fault's class."""

    ts: datetime
    from_class: str
    to_class: str
    title: str
    evidence: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Seen:
    """The condition still holds at `ts`."""

    ts: datetime


@dataclass(frozen=True, slots=True)
class ClearingStarted:
    """Every condition false since `ts`: the hold time runs."""

    ts: datetime


@dataclass(frozen=True, slots=True)
class ClearingCancelled:
    """A condition came back before the hold time ran out."""

    ts: datetime


@dataclass(frozen=True, slots=True)
class Cleared:
    """The hold time ran out: the fault cleared at `ts` (clearing start + hold)."""

    ts: datetime
    evidence: dict[str, Any]


Transition: TypeAlias = Opened | Escalated | Seen | ClearingStarted | ClearingCancelled | Cleared


@dataclass
class FaultState:
    """What the database says about the open fault of a (unit, rule)."""

    fault_class: str
    opened_at: datetime
    last_seen: datetime
    clearing_since: datetime | None = None


@dataclass
class RuleMachine:
    """One rule for one unit: monitors in, transitions out."""

    rule: AnyRule
    catalog: Catalog
    state: FaultState | None = None
    horizon: datetime | None = None
    alive_hint: datetime | None = None
    triggers: Sequence[Monitor] = field(init=False)
    escalations: Sequence[Monitor] = field(init=False)
    last_cycle: datetime | None = field(default=None, init=False)
    monitors: tuple[Monitor, ...] = field(init=False)
    """Triggers, then escalations (fed every observation)."""

    def __post_init__(self) -> None:
        self.triggers = [monitor(c, self.catalog, self.alive_hint) for c in self.rule.triggers]
        self.escalations = [monitor(c, self.catalog, self.alive_hint)
                            for c in self.rule.escalations]
        self.monitors = (*self.triggers, *self.escalations)

    @property
    def timed(self) -> bool:
        """Whether wall time alone can change this rule (communication loss)."""
        return any(m.timed for m in self.monitors)

    @property
    def clearing(self) -> bool:
        """Open, with the hold time running."""
        return self.state is not None and self.state.clearing_since is not None

    def feed(self, obs: Observation) -> list[Transition]:
        """Observe, then step the state machine."""
        if isinstance(obs, Tick):
            at = obs.now
            for m in self.monitors:
                m.time(obs)
            return self._step(at, tick=True)
        at = obs.ts
        if self.horizon is not None and at < self.horizon:
            return []
        if isinstance(obs, Cycle):  # cycles come in order; an older one is a replay
            if self.last_cycle is not None and at < self.last_cycle:
                return []
            self.last_cycle = at
        if isinstance(obs, Cycle):
            for m in self.monitors:
                m.cycle(obs)
        else:
            for m in self.monitors:
                m.event(obs)
        return self._step(at, tick=False)

    def _held(self, monitors: Sequence[Monitor], at: datetime, tick: bool) -> list[Monitor]:
        # on a tick only timed monitors move; the others stay as their last observation left them
        return [m for m in monitors if (m.held(at, tick=True) if m.timed and tick
                                        else m.held(m.latest or at if tick else at))]

    def _step(self, at: datetime, *, tick: bool) -> list[Transition]:
        rule, st = self.rule, self.state
        if st is None:
            held = self._held(self.triggers, at, tick)
            if held and tick:  # opened by wall time: when it became held, not when we looked
                at = min(m.held_at() or at for m in held)
            if not held or (self.horizon is not None and at <= self.horizon):
                return []
            worse_held = self._held(self.escalations, at, tick)
            esc = rule.escalate
            cls = esc.fault_class if esc and worse_held else rule.fault_class
            title = (esc.title or rule.title) if esc and worse_held else rule.title
            self.state = FaultState(cls, at, at)
            evidence = {
                "rule": rule.as_dict(),
                "opened_at": iso(at),
                "trigger": [m.evidence() for m in held],
                **({"escalations": [self._escalation(at, rule.fault_class, cls, worse_held)]}
                   if worse_held else {}),
            }
            return [Opened(at, cls, title, rule.fault_class if worse_held else None, evidence)]
        out: list[Transition] = []
        if any(m.truth() is True for m in self.triggers):
            # what is recorded is in the samples' time, also when a tick noticed it
            rec = max([at] if not tick else
                      [t for t in (st.last_seen, *(m.latest for m in self.triggers)) if t])
            if st.clearing_since is not None:
                st.clearing_since = None
                out.append(ClearingCancelled(rec))
            esc = rule.escalate
            if esc is not None and worse(esc.fault_class, st.fault_class):
                worse_held = self._held(self.escalations, at, tick)
                if worse_held:
                    out.append(Escalated(rec, st.fault_class, esc.fault_class,
                                         esc.title or rule.title,
                                         self._escalation(rec, st.fault_class, esc.fault_class,
                                                          worse_held)))
                    st.fault_class = esc.fault_class
            if at > st.last_seen and not tick:  # fault times are the samples' times
                st.last_seen = at
                out.append(Seen(at))
            return out
        known_false = any(m.truth() is False for m in self.triggers)
        if st.clearing_since is None and known_false and not tick:
            st.clearing_since = max(at, st.opened_at)
            out.append(ClearingStarted(st.clearing_since))
        if st.clearing_since is not None:
            cleared_at = st.clearing_since + timedelta(seconds=rule.clear_hold_s)
            if at >= cleared_at:
                out.append(Cleared(cleared_at, {
                    "cleared_at": iso(cleared_at),
                    "clearing_since": iso(st.clearing_since),
                    "hold_s": rule.clear_hold_s,
                    "last": [m.evidence() for m in self.triggers],
                }))
                self.state = None
                self.horizon = cleared_at
        return out

    @staticmethod
    def _escalation(at: datetime, frm: str, to: str, held: Sequence[Monitor]) -> dict[str, Any]:
        return {"ts": iso(at), "from": frm, "to": to, "trigger": [m.evidence() for m in held]}

    def reset(self, horizon: datetime | None) -> None:
        """The fault is gone from the database (cleared elsewhere): idle from `horizon` on."""
        self.state = None
        if horizon is not None and (self.horizon is None or horizon > self.horizon):
            self.horizon = horizon

    def adopt(self, state: FaultState) -> None:
        """Another process opened this fault first: follow the stored one."""
        self.state = state
