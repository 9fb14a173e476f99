"""Read planner: valid and minimal on every shipped profile and on random point sets."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import PlanError
from protocols.planner import MODBUS_MAX_READ, ReadRequest, minimum_requests, plan_reads
from protocols.profiles import Profile, all_profiles
from protocols.registers import PointDef, PointType, Table

PROFILES = list(all_profiles())


def _merged(intervals: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def assert_valid_plan(
    points: Sequence[PointDef], plan: Sequence[ReadRequest], max_gap: int, max_count: int
) -> None:
    """Each point in exactly one request of its table, requests tight, small and gap-honest."""
    by_name = {p.name: p for p in points}
    assert len(by_name) == len(points), "test points need unique names"
    carried = [name for req in plan for name in req.points]
    assert sorted(carried) == sorted(by_name), "every point exactly once"
    for req in plan:
        assert 1 <= req.count <= max_count
        assert req.count <= MODBUS_MAX_READ
        pts = [by_name[n] for n in req.points]
        assert all(p.table is req.table for p in pts), "holding and input never mixed"
        assert all(req.address <= p.address and p.end <= req.end for p in pts)
        assert min(p.address for p in pts) == req.address, "no wasted head"
        assert max(p.end for p in pts) == req.end, "no wasted tail"
        spans = _merged([(p.address, p.end) for p in pts])
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start - end <= max_gap, f"gap {start - end} > {max_gap} in {req}"
    for table in Table:
        reqs = sorted((r for r in plan if r.table is table), key=lambda r: r.address)
        for a, b in itertools.pairwise(reqs):
            assert a.end <= b.address, "requests of one table do not overlap"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.series)
def test_shipped_profiles_are_planned_minimally(
    profile: Profile, record_property: Callable[[str, object], None]
) -> None:
    points = profile.poll_points
    plan = plan_reads(points, max_gap=profile.max_gap)
    n = len(plan)
    m = minimum_requests(points, max_gap=profile.max_gap)
    line = f"{profile.series}: {n} requests (minimum {m}) for {len(points)} points"
    print(line)
    record_property("planner", line)
    assert n == m
    assert_valid_plan(points, plan, profile.max_gap, MODBUS_MAX_READ)
    # planning every point (headers, pads, write-only too) stays minimal as well
    full = plan_reads(profile.points, max_gap=profile.max_gap)
    assert len(full) == minimum_requests(profile.points, max_gap=profile.max_gap)


def test_every_shipped_profile_is_exercised() -> None:
    assert {p.series for p in PROFILES} >= {"EMU-BS", "EMU-PV"}


def _pt(name: str, address: int, size: int = 1, table: Table = Table.HOLDING) -> PointDef:
    if size == 1:
        return PointDef(name, address, PointType.UINT16, table=table)
    return PointDef(name, address, PointType.STRING, size=size, table=table)


def test_max_gap_zero_splits_at_every_hole() -> None:
    points = [_pt("a", 0), _pt("b", 1), _pt("c", 3), _pt("d", 4, 2)]
    plan = plan_reads(points, max_gap=0)
    assert [(r.address, r.count) for r in plan] == [(0, 2), (3, 3)]
    assert len(plan_reads(points, max_gap=1)) == 1


def test_small_max_count_packs_greedily() -> None:
    points = [_pt(f"p{i}", i) for i in range(10)]
    plan = plan_reads(points, max_gap=0, max_count=4)
    assert [(r.address, r.count) for r in plan] == [(0, 4), (4, 4), (8, 2)]
    assert minimum_requests(points, max_gap=0, max_count=4) == 3


def test_holding_and_input_are_planned_apart() -> None:
    points = [_pt("h", 10), _pt("i", 10, table=Table.INPUT), _pt("h2", 11)]
    plan = plan_reads(points)
    assert [(r.table, r.address, r.count) for r in plan] == [
        (Table.HOLDING, 10, 2),
        (Table.INPUT, 10, 1),
    ]


def test_overlapping_points_share_one_request() -> None:
    points = [_pt("whole", 0, 4), _pt("part", 1, 2), _pt("tail", 3, 3)]
    plan = plan_reads(points, max_gap=0)
    assert [(r.address, r.count, set(r.points)) for r in plan] == [
        (0, 6, {"whole", "part", "tail"})
    ]


def test_no_points_no_requests() -> None:
    assert plan_reads([]) == []
    assert minimum_requests([]) == 0


def test_point_larger_than_a_request_raises() -> None:
    with pytest.raises(PlanError, match="big"):
        plan_reads([_pt("big", 0, 126)])
    with pytest.raises(PlanError, match="big"):
        plan_reads([_pt("big", 0, 9)], max_count=8)
    with pytest.raises(PlanError, match="a, b"):
        minimum_requests([_pt("a", 0, 6), _pt("b", 4, 6)], max_count=8)


@pytest.mark.parametrize(("max_count", "max_gap"), [(0, 0), (126, 0), (10, -1)])
def test_bad_limits_raise(max_count: int, max_gap: int) -> None:
    with pytest.raises(PlanError):
        plan_reads([_pt("a", 0)], max_count=max_count, max_gap=max_gap)
    with pytest.raises(PlanError):
        minimum_requests([_pt("a", 0)], max_count=max_count, max_gap=max_gap)


@st.composite
def point_sets(draw: st.DrawFn) -> list[PointDef]:
    """Random points: clustered addresses (so that gaps and overlaps occur), both tables."""
    n = draw(st.integers(0, 40))
    window = draw(st.sampled_from([20, 100, 400, 2000]))
    base = draw(st.sampled_from([0, 40000, 65536 - window - 8]))
    points = []
    for i in range(n):
        size = draw(st.integers(1, 8))
        address = base + draw(st.integers(0, window))
        table = draw(st.sampled_from(list(Table)))
        points.append(_pt(f"p{i}", address, size, table))
    return points


def _brute_force_minimum(
    spans: Sequence[tuple[int, int]], max_gap: int, max_count: int
) -> int:
    """Independent oracle: try every cut of the sorted spans into contiguous runs."""
    n = len(spans)
    best = n
    for mask in range(2 ** max(n - 1, 0)):
        runs, start = [], 0
        for i in range(1, n):
            if mask >> (i - 1) & 1:
                runs.append(spans[start:i])
                start = i
        runs.append(spans[start:])
        if all(
            run[-1][1] - run[0][0] <= max_count
            and all(b[0] - a[1] <= max_gap for a, b in itertools.pairwise(run))
            for run in runs
            if run
        ):
            best = min(best, len(runs) if n else 0)
    return best


def _check_random(points: list[PointDef], max_gap: int, max_count: int) -> None:
    """Overlapping points cannot be split: a merged span wider than a request must raise."""
    widest = max(
        (
            end - start
            for table in Table
            for start, end in _merged([(p.address, p.end) for p in points if p.table is table])
        ),
        default=0,
    )
    if widest > max_count:
        with pytest.raises(PlanError, match="span more than"):
            plan_reads(points, max_gap=max_gap, max_count=max_count)
        with pytest.raises(PlanError, match="span more than"):
            minimum_requests(points, max_gap=max_gap, max_count=max_count)
        return
    plan = plan_reads(points, max_gap=max_gap, max_count=max_count)
    assert_valid_plan(points, plan, max_gap, max_count)
    assert len(plan) == minimum_requests(points, max_gap=max_gap, max_count=max_count)
    per_table = [_merged([(p.address, p.end) for p in points if p.table is t]) for t in Table]
    if all(len(spans) <= 10 for spans in per_table):
        oracle = sum(_brute_force_minimum(spans, max_gap, max_count) for spans in per_table)
        assert len(plan) == oracle


@settings(max_examples=300, deadline=None)
@given(point_sets(), st.integers(0, 20), st.one_of(st.just(125), st.integers(16, 125)))
def test_random_point_sets_plan_validly_and_minimally(
    points: list[PointDef], max_gap: int, max_count: int
) -> None:
    _check_random(points, max_gap, max_count)


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.integers(0, 3), st.integers(1, 12))
def test_random_point_sets_with_tiny_requests(
    points: list[PointDef], max_gap: int, max_count: int
) -> None:
    _check_random(points, max_gap, max_count)
