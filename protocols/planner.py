"""Read planning: the fewest Modbus read requests that cover a device's points.

Holding and input registers are planned apart. A request spans at most `max_count`
registers (125, the Modbus limit for function codes 3 and 4) and may read across a gap of at
most `max_gap` unused registers between two points, so that one round trip replaces two.

Why greedy is minimal: overlapping points are first joined into disjoint spans. An optimal
plan can then be taken as contiguous runs of spans in address order (a request covering
spans 1 and 3 covers 2 as well), and any contiguous sub-run of a valid run is valid again
(its width and its gaps only shrink). For such "hereditary" partitions, extending each run
as far as it goes is optimal; the tests check it against an exhaustive dynamic programme on
every shipped profile and on random point sets.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocols.errors import PlanError
from protocols.registers import PointDef, Table

MODBUS_MAX_READ = 125


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read: table, start address, register count, and the points it carries."""

    table: Table
    address: int
    count: int
    points: tuple[str, ...]

    @property
    def end(self) -> int:
        """First address after the request."""
        return self.address + self.count


def _check(max_count: int, max_gap: int) -> None:
    if not 1 <= max_count <= MODBUS_MAX_READ:
        raise PlanError(f"max_count must be within 1..{MODBUS_MAX_READ}, got {max_count}")
    if max_gap < 0:
        raise PlanError(f"max_gap must not be negative, got {max_gap}")


@dataclass(frozen=True, slots=True)
class _Span:
    start: int
    end: int
    names: tuple[str, ...]


def _spans(points: Iterable[PointDef], table: Table, max_count: int) -> list[_Span]:
    """Points of one table as disjoint spans, sorted; overlapping points share a span."""
    spans: list[_Span] = []
    for p in sorted((p for p in points if p.table is table), key=lambda p: (p.address, p.end)):
        if spans and p.address < spans[-1].end:
            last = spans[-1]
            spans[-1] = _Span(last.start, max(last.end, p.end), (*last.names, p.name))
        else:
            spans.append(_Span(p.address, p.end, (p.name,)))
        if spans[-1].end - spans[-1].start > max_count:
            raise PlanError(
                f"point(s) {', '.join(spans[-1].names)} span more than {max_count} registers"
            )
    return spans


def _fits(run: Sequence[_Span], max_count: int, max_gap: int) -> bool:
    """Whether one request can carry this run of disjoint spans."""
    if run[-1].end - run[0].start > max_count:
        return False
    return all(b.start - a.end <= max_gap for a, b in itertools.pairwise(run))


def plan_reads(
    points: Iterable[PointDef], *, max_gap: int = 8, max_count: int = MODBUS_MAX_READ
) -> list[ReadRequest]:
    """The minimal list of read requests covering `points`, ordered by table and address."""
    _check(max_count, max_gap)
    pts = list(points)
    plan: list[ReadRequest] = []
    for table in (Table.HOLDING, Table.INPUT):
        run: list[_Span] = []
        for span in _spans(pts, table, max_count):
            if (
                run
                and span.start - run[-1].end <= max_gap
                and span.end - run[0].start <= max_count
            ):
                run.append(span)
                continue
            if run:
                plan.append(_request(table, run))
            run = [span]
        if run:
            plan.append(_request(table, run))
    return plan


def _request(table: Table, run: Sequence[_Span]) -> ReadRequest:
    names = tuple(n for s in run for n in s.names)
    return ReadRequest(table, run[0].start, run[-1].end - run[0].start, names)


def minimum_requests(
    points: Iterable[PointDef], *, max_gap: int = 8, max_count: int = MODBUS_MAX_READ
) -> int:
    """The least number of requests, found exhaustively (O(n²) per table); the planner's proof."""
    _check(max_count, max_gap)
    pts = list(points)
    total = 0
    for table in (Table.HOLDING, Table.INPUT):
        spans = _spans(pts, table, max_count)
        n = len(spans)
        best = [0] + [n + 1] * n
        for i in range(1, n + 1):
            for j in range(i - 1, -1, -1):
                if not _fits(spans[j:i], max_count, max_gap):
                    break  # disjoint spans: starting earlier only widens the run
                best[i] = min(best[i], best[j] + 1)
        total += best[n]
    return total
