"""The fault engine's pure core: each kind of condition opens, holds, escalates and clears as
its rule says, by the observations' own timestamps, and replays change nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from protocols.fault_rules import load_rulebook
from protocols.messages import Event, EventKind, PointValue, Quality, TelemetryPoint
from server.faults.rules import (
    Cleared,
    ClearingCancelled,
    ClearingStarted,
    Cycle,
    Escalated,
    FaultState,
    Observation,
    Opened,
    RuleMachine,
    Seen,
    Tick,
    Transition,
    build_cycles,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TEMP, ALARM, RISO, STATUS = "emu.IntTmp", "emu.Alarm", "emu.Riso", "emu.Status"
TRIP_BIT, OVERTEMP_BIT = 1 << 3, 1 << 0


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def cyc(s: float, values: Mapping[str, PointValue] | None = None, *,
        stale: Sequence[str] = (), lost: bool = False) -> Cycle:
    """A poll cycle at T0+s: readable values, stale points, or all comm_lost."""
    values = dict(values or {})
    if lost:
        return Cycle(at(s), {}, {}, {Quality.COMM_LOST: 150})
    qualities = dict.fromkeys(values, Quality.GOOD) | dict.fromkeys(stale, Quality.STALE)
    counts = {Quality.GOOD: 150 - len(stale)} | ({Quality.STALE: len(stale)} if stale else {})
    return Cycle(at(s), values, qualities, counts)


def ev(s: float, kind: EventKind, code: str | None = None) -> Event:
    return Event(ts=at(s), kind=kind, device="u1", code=code)


def tick(s: float) -> Tick:
    return Tick(at(s))


def machine(code: str, patch: Mapping[str, Any] | None = None, series: str = "EMU-BS",
            **kw: Any) -> RuleMachine:
    """A machine for a shipped rule, or a rule changed or added through a site policy."""
    book = load_rulebook(series)
    if patch is not None:
        book = book.with_policy({"rules": {code: dict(patch)}}, "test")
    return RuleMachine(book.rule(code), book.catalog, **kw)


def summary(t: Transition) -> str:
    secs = f"{(t.ts - T0).total_seconds():g}"
    if isinstance(t, Opened):
        return f"{secs} open {t.fault_class}" + (f" from {t.escalated_from}"
                                                 if t.escalated_from else "")
    if isinstance(t, Escalated):
        return f"{secs} escalate {t.from_class}>{t.to_class}"
    names = {Seen: "seen", ClearingStarted: "clearing", ClearingCancelled: "back",
             Cleared: "cleared"}
    return f"{secs} {names[type(t)]}"


def run(m: RuleMachine, observations: Sequence[Observation], *, seen: bool = False) -> list[str]:
    out = [summary(t) for obs in observations for t in m.feed(obs)]
    return out if seen else [s for s in out if not s.endswith(" seen")]


def temps(*pairs: tuple[float, float]) -> list[Observation]:
    return [cyc(s, {TEMP: v, ALARM: 0}) for s, v in pairs]


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    patch: Mapping[str, Any] | None
    observations: Sequence[Observation]
    expected: Sequence[str]


HOT = {"clear_hold_s": 20}
CASES = [
    Case("threshold opens after for_s, not on a single sample", "over_temperature", HOT,
         temps((0, 40), (5, 75), (10, 40), (15, 75), (20, 76), (25, 77), (30, 40)),
         ["25 open B", "30 clearing"]),
    Case("threshold clears after the hold", "over_temperature", HOT,
         temps((0, 75), (5, 75), (10, 75), (15, 40), (20, 40), (30, 40), (35, 40)),
         ["10 open B", "15 clearing", "35 cleared"]),
    Case("a true sample during the hold cancels the clearing", "over_temperature", HOT,
         temps((0, 75), (10, 75), (15, 40), (30, 75), (35, 40), (50, 40), (55, 40)),
         ["10 open B", "15 clearing", "30 back", "35 clearing", "55 cleared"]),
    Case("stale samples neither hold nor clear", "over_temperature", HOT,
         [*temps((0, 75), (10, 75)), cyc(15, stale=[TEMP, ALARM]), cyc(40, stale=[TEMP]),
          *temps((45, 40))],
         ["10 open B", "45 clearing"]),
    Case("the device's own alarm bit opens at once", "over_temperature", HOT,
         [cyc(0, {TEMP: 40, ALARM: OVERTEMP_BIT}), cyc(5, {TEMP: 40, ALARM: 0}),
          cyc(25, {TEMP: 40, ALARM: 0})],
         ["0 open B", "5 clearing", "25 cleared"]),
    Case("escalates B to A past the higher limit", "over_temperature", HOT,
         temps((0, 75), (10, 75), (15, 95), (20, 96), (25, 40), (45, 40)),
         ["10 open B", "15 escalate B>A", "25 clearing", "45 cleared"]),
    Case("escalates B to A when the unit trips", "over_temperature", HOT,
         [*temps((0, 75), (10, 75)), cyc(15, {TEMP: 75, ALARM: TRIP_BIT})],
         ["10 open B", "15 escalate B>A"]),
    Case("opens at A at once when the worse condition already holds", "over_temperature", HOT,
         temps((0, 95), (10, 95)),
         ["10 open A from B"]),
    Case("an escalation without the condition itself does nothing", "over_temperature", HOT,
         [cyc(0, {TEMP: 40, ALARM: TRIP_BIT}), cyc(30, {TEMP: 40, ALARM: TRIP_BIT})],
         []),
    Case("threshold on an enum symbol", "stopped",
         {"kind": "threshold", "title": "Stopped", "class": "A", "point": STATUS, "op": "==",
          "value": "TRIPPED", "clear_hold_s": 0},
         [cyc(0, {STATUS: 2}), cyc(5, {STATUS: 6}), cyc(10, {STATUS: 2})],
         ["5 open A", "10 clearing", "10 cleared"]),
    Case("alarm bit", "trip", {"clear_hold_s": 10},
         [cyc(0, {ALARM: 0}), cyc(5, {ALARM: TRIP_BIT | OVERTEMP_BIT}), cyc(10, {ALARM: 1}),
          cyc(15, {ALARM: 0}), cyc(20, {ALARM: 0})],
         ["5 open A", "10 clearing", "20 cleared"]),
    Case("rate: a sustained rise opens, a step does not", "rise",
         {"kind": "rate", "title": "Rising", "class": "B", "point": TEMP, "limit": 2.0,
          "window_s": 60, "for_s": 60, "clear_hold_s": 0},
         [*temps(*((s, 30.0) for s in range(0, 60, 10))),
          *temps(*((s, 60.0) for s in range(60, 200, 10))),  # a step: true for < 60 s
          *temps(*((s, 60 + (s - 200) * 0.1) for s in range(200, 400, 10))),  # 6 C/min
          *temps(*((s, 80.0) for s in range(400, 500, 10)))],
         ["290 open B", "440 clearing", "440 cleared"]),
    Case("rate: falling", "sink",
         {"kind": "rate", "title": "Sinking", "class": "C", "point": RISO, "limit": 100.0,
          "window_s": 20, "direction": "fall", "clear_hold_s": 0},
         [cyc(s, {RISO: 2000 - 50 * s}) for s in range(0, 40, 5)],
         ["10 open C"]),
    Case("flapping of a value", "alarm_flapping", {"count": 3, "window_s": 60,
                                                    "clear_hold_s": 10},
         [cyc(0, {ALARM: 0}), cyc(10, {ALARM: 1}), cyc(20, {ALARM: 1}), cyc(30, {ALARM: 0}),
          cyc(40, {ALARM: 1}), cyc(100, {ALARM: 1}), cyc(110, {ALARM: 1})],
         ["40 open D", "100 clearing", "110 cleared"]),
    Case("flapping of one bit ignores the others", "trip_flapping",
         {"kind": "flapping", "title": "Trips", "class": "D", "signal": "value",
          "point": ALARM, "bit": "TRIP", "window_s": 60, "count": 2},
         [cyc(0, {ALARM: 0}), cyc(10, {ALARM: 1}), cyc(20, {ALARM: 0}),
          cyc(30, {ALARM: TRIP_BIT}), cyc(40, {ALARM: 0})],
         ["40 open D"]),
    Case("flapping of quality: stale cycles", "intermittent_comms", {"clear_hold_s": 30},
         [cyc(s, {ALARM: 0}, stale=[TEMP] if s in (20, 50, 65) else ())
          for s in range(0, 400, 5)],
         ["65 open D", "140 clearing", "170 cleared"]),
    Case("flapping of quality: missed cycles count", "intermittent_comms", None,
         [cyc(s, {ALARM: 0}) for s in (0, 5, 10, 15, 20, 30, 35, 45, 50, 60)],
         ["60 open D"]),
    Case("flapping of quality: a reported comm loss is not flapping", "intermittent_comms", None,
         [*(cyc(s, {ALARM: 0}) for s in range(0, 25, 5)), cyc(35, lost=True),
          *(cyc(s, {ALARM: 0}) for s in range(100, 400, 5))],
         []),
    Case("flapping of quality: a healthy unit never", "intermittent_comms", None,
         [cyc(s, {ALARM: 0}) for s in range(0, 1000, 5)],
         []),
    Case("escalates D to C when communication mostly fails", "intermittent_comms",
         {"escalate": {"when": [{"kind": "flapping", "signal": "quality", "window_s": 60,
                                 "count": 10}]}},
         [cyc(s, {ALARM: 0}, stale=[TEMP] if s % 10 == 0 or s >= 100 else ())
          for s in range(0, 160, 5)],
         ["20 open D", "135 escalate D>C"]),
    Case("flapping of events", "comm_flapping", {"clear_hold_s": 0},
         [ev(0, EventKind.COMM_LOST), ev(30, EventKind.COMM_RESTORED),
          ev(100, EventKind.COMM_LOST), ev(500, EventKind.COMM_LOST),
          ev(1000, EventKind.COMM_RESTORED), ev(2000, EventKind.COMM_RESTORED)],
         ["500 open D", "1000 clearing", "1000 cleared"]),
    Case("comm loss: reported, lasting for_s, then restored", "comm_loss",
         {"clear_hold_s": 10},
         [cyc(0, {ALARM: 0}), ev(15, EventKind.COMM_LOST), cyc(15, lost=True), tick(20),
          tick(25), tick(30), ev(40, EventKind.COMM_RESTORED), cyc(40, {ALARM: 0}),
          cyc(45, {ALARM: 0}), cyc(50, {ALARM: 0})],
         ["25 open A", "40 clearing", "50 cleared"]),
    Case("comm loss: a blip shorter than for_s is no fault", "comm_loss", None,
         [cyc(0, {ALARM: 0}), ev(15, EventKind.COMM_LOST), tick(20),
          ev(22, EventKind.COMM_RESTORED), cyc(22, {ALARM: 0}), tick(30), tick(81)],
         []),
    Case("comm loss: silence", "comm_loss", None,
         [cyc(0, {ALARM: 0}), cyc(5, {ALARM: 0}), tick(30), tick(64), tick(70)],
         ["65 open A"]),
    Case("comm loss: silent again while clearing, in the samples' time", "comm_loss", None,
         [cyc(0, {ALARM: 0}), ev(15, EventKind.COMM_LOST), tick(30),
          ev(40, EventKind.COMM_RESTORED), cyc(40, {ALARM: 0}), tick(50), tick(110)],
         ["25 open A", "40 clearing", "100 back"]),
    Case("comm loss: silence detection can be off", "comm_loss", {"silence_s": 0},
         [cyc(0, {ALARM: 0}), tick(600)],
         []),
    Case("comm loss: a loss reported after the unit was back is over", "comm_loss", None,
         [cyc(0, {ALARM: 0}), cyc(30, {ALARM: 0}), ev(15, EventKind.COMM_LOST), tick(60)],
         []),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_kinds(case: Case) -> None:
    assert run(machine(case.code, case.patch), case.observations) == list(case.expected)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_feeding_everything_twice_changes_nothing(case: Case) -> None:
    m = machine(case.code, case.patch)
    run(m, case.observations)
    assert run(m, [o for o in case.observations if not isinstance(o, Tick)]) == []


def test_seen_moves_forward_only() -> None:
    m = machine("trip")
    obs = [cyc(s, {ALARM: TRIP_BIT}) for s in (0, 5, 10)]
    assert run(m, obs, seen=True) == ["0 open A", "5 seen", "10 seen"]
    assert run(m, obs, seen=True) == []


def test_opened_carries_evidence() -> None:
    m = machine("over_temperature")
    out = [t for o in temps((0, 75), (5, 76), (10, 77)) for t in m.feed(o)]
    opened = out[0]
    assert isinstance(opened, Opened)
    assert opened.title == "Over-temperature"
    ev_ = opened.evidence
    assert ev_["rule"]["code"] == "over_temperature"
    assert ev_["opened_at"] == "2026-03-01T12:00:10Z"
    trigger = ev_["trigger"][0]
    assert trigger == {
        "kind": "threshold", "point": TEMP, "op": ">", "value": 70.0, "for_s": 10.0,
        "since": "2026-03-01T12:00:00Z",
        "samples": [{"ts": f"2026-03-01T12:00:{s:02d}Z", "value": v, "quality": "good"}
                    for s, v in ((0, 75), (5, 76), (10, 77))],
    }


def test_escalation_title_and_evidence() -> None:
    m = machine("over_temperature")
    out = [t for o in temps((0, 75), (10, 75), (15, 95)) for t in m.feed(o)]
    esc = next(t for t in out if isinstance(t, Escalated))
    assert esc.title == "Over-temperature: unit at its limit or tripped"
    assert esc.evidence["from"] == "B"
    assert esc.evidence["trigger"][0]["value"] == 90.0


def test_horizon_keeps_old_data_from_reopening() -> None:
    """What the database says was cleared at 100 stays cleared for data up to 100."""
    m = machine("trip", horizon=at(100))
    assert run(m, [cyc(s, {ALARM: TRIP_BIT}) for s in (50, 90, 100)]) == []
    assert run(m, [cyc(105, {ALARM: TRIP_BIT})]) == ["105 open A"]


def test_an_open_fault_from_the_database_carries_on() -> None:
    state = FaultState("A", opened_at=at(0), last_seen=at(60), clearing_since=None)
    m = machine("trip", {"clear_hold_s": 10}, state=state, horizon=at(60))
    assert run(m, [cyc(30, {ALARM: 0})]) == []  # older than the row: a replay
    assert run(m, [cyc(65, {ALARM: TRIP_BIT}), cyc(70, {ALARM: 0}), cyc(80, {ALARM: 0})],
               seen=True) == ["65 seen", "70 clearing", "80 cleared"]


def test_a_restarted_flapping_count_cannot_clear_an_open_fault_early() -> None:
    state = FaultState("D", opened_at=at(0), last_seen=at(10))
    m = machine("intermittent_comms", state=state, horizon=at(10))
    healthy = [cyc(s, {ALARM: 0}) for s in range(15, 300, 5)]
    out = run(m, healthy)
    assert out[0] == "135 clearing"  # after one whole window (120 s) watched
    assert out[-1] == "165 cleared"


def test_tick_clears_a_unit_that_stopped_reporting() -> None:
    m = machine("trip", {"clear_hold_s": 30})
    assert run(m, [cyc(0, {ALARM: TRIP_BIT}), cyc(5, {ALARM: 0})]) == ["0 open A", "5 clearing"]
    assert m.clearing
    assert run(m, [tick(20)]) == []
    assert run(m, [tick(300)]) == ["35 cleared"]  # at clearing start + hold, not at the tick


def test_tick_does_not_open_sample_driven_rules() -> None:
    m = machine("over_temperature")
    run(m, temps((0, 75)))
    assert run(m, [tick(100)]) == []
    assert not m.timed
    assert machine("comm_loss").timed


def test_reset_and_adopt() -> None:
    m = machine("trip")
    run(m, [cyc(0, {ALARM: TRIP_BIT})])
    m.reset(at(5))
    assert run(m, [cyc(5, {ALARM: TRIP_BIT})]) == []
    assert run(m, [cyc(10, {ALARM: TRIP_BIT})]) == ["10 open A"]
    m.adopt(FaultState("A", at(0), at(20)))
    assert run(m, [cyc(15, {ALARM: TRIP_BIT})], seen=True) == []


def test_build_cycles_groups_by_timestamp() -> None:
    def p(s: float, point: str, value: PointValue, q: Quality = Quality.GOOD) -> TelemetryPoint:
        return TelemetryPoint(device="u1", point=point, ts=at(s), value=value, quality=q)

    cycles = build_cycles(
        [p(5, TEMP, 40.0), p(0, TEMP, 39.0), p(0, "emu.Uptime", 7), p(5, ALARM, 8, Quality.STALE),
         p(5, RISO, None, Quality.COMM_LOST), p(0, RISO, 5000.0, Quality.OUT_OF_RANGE)],
        watched={TEMP, ALARM, RISO},
    )
    assert [c.ts for c in cycles] == [at(0), at(5)]
    first, second = cycles
    assert first.values == {TEMP: 39.0, RISO: 5000.0}
    assert first.counts == {Quality.GOOD: 2, Quality.OUT_OF_RANGE: 1}
    assert first.alive
    assert not first.lost
    assert second.values == {TEMP: 40.0}
    assert second.qualities == {TEMP: Quality.GOOD, ALARM: Quality.STALE,
                                RISO: Quality.COMM_LOST}
    lost = build_cycles([p(9, TEMP, None, Quality.COMM_LOST)], {TEMP})[0]
    assert lost.lost
    assert not lost.alive
