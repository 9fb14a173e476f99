"""The on-disk spool with real SQLite files: seq per stream, bounded size, delete by id, depth."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.batcher import EVENTS, TELEMETRY, Batcher
from agent.errors import SpoolError
from agent.spool import Dropped, Spool
from protocols.clock import SystemClock
from protocols.messages import EventBatch, EventKind, Quality, TelemetryBatch

MB = 1024 * 1024


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.db", 10 * MB)
    await s.open()
    yield s
    await s.close()


def sized(size: int, tag: str = "") -> bytes:
    """A payload of exactly `size` bytes."""
    return (tag + "x" * size)[:size].encode()


async def append(spool: Spool, stream: str, size: int, points: int) -> tuple[int, Dropped | None]:
    return await spool.append(stream, lambda seq: sized(size, f"{stream}{seq}:"), points)


async def append_named(spool: Spool, stream: str) -> tuple[int, Dropped | None]:
    """A batch whose payload says which stream and seq it was built for."""
    return await spool.append(stream, lambda seq: f"{stream}-{seq}".encode(), 1)


async def test_seq_rises_per_stream_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 10 * MB)
    await spool.open()
    got = [(await append_named(spool, stream))[0]
           for stream in (TELEMETRY, TELEMETRY, EVENTS, TELEMETRY, EVENTS)]
    assert got == [1, 2, 1, 3, 2]
    rows = await spool.peek(0, 10)
    assert [r.payload for r in rows] == [b"telemetry-1", b"telemetry-2", b"events-1",
                                         b"telemetry-3", b"events-2"], "payload built for its seq"
    await spool.delete([r.id for r in rows])  # an empty outbox must not reset the seq
    await spool.close()

    reopened = Spool(path, 10 * MB)
    await reopened.open()
    try:
        assert (await reopened.append(TELEMETRY, lambda seq: b"t", 1))[0] == 4
        assert (await reopened.append(EVENTS, lambda seq: b"e", 1))[0] == 3
        assert (await reopened.append("other", lambda seq: b"o", 1))[0] == 1
    finally:
        await reopened.close()


async def test_delete_by_ids_and_depth(spool: Spool) -> None:
    assert await spool.depth() == (0, 0, None)
    before = time.time()
    for points in (10, 20, 30):
        await append(spool, TELEMETRY, 50, points)
    batches, points, oldest = await spool.depth()
    assert (batches, points) == (3, 60)
    assert oldest is not None
    assert before - 1 <= oldest <= time.time()

    rows = await spool.peek(0, 10)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert [r.seq for r in await spool.peek(rows[0].id, 1)] == [2], "peek after an id, limited"
    await spool.delete([rows[0].id, rows[2].id])
    assert (await spool.depth())[:2] == (1, 20)
    assert [r.seq for r in await spool.peek(0, 10)] == [2]
    await spool.delete([rows[0].id])  # already gone (a late duplicate ack): no error
    await spool.delete([])
    await spool.delete([rows[1].id])
    assert await spool.depth() == (0, 0, None)


async def test_full_spool_drops_oldest_telemetry_and_keeps_events(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1000)
    await spool.open()
    try:
        assert (await append(spool, EVENTS, 100, 1))[1] is None
        assert (await append(spool, TELEMETRY, 300, 3))[1] is None
        assert (await append(spool, TELEMETRY, 300, 4))[1] is None
        assert (await append(spool, TELEMETRY, 300, 5))[1] is None, "exactly full is not over"
        seq, dropped = await append(spool, TELEMETRY, 400, 6)
        # 1400 bytes > 1000: the oldest telemetry goes until at most 90 % (900) are left
        assert seq == 4
        assert dropped == Dropped(batches=2, points=7, first_seq=1, last_seq=2)
        rows = await spool.peek(0, 10)
        assert [(r.stream, r.seq) for r in rows] == [(EVENTS, 1), (TELEMETRY, 3), (TELEMETRY, 4)]
        assert (await spool.depth())[:2] == (3, 12)

        # an event over the limit pushes telemetry out, never another event
        assert (await append(spool, EVENTS, 600, 1))[1] == Dropped(2, 11, 3, 4)
        assert (await append(spool, EVENTS, 600, 1))[1] is None, "events are never dropped"
        assert [(r.stream, r.seq) for r in await spool.peek(0, 10)] == [
            (EVENTS, 1), (EVENTS, 2), (EVENTS, 3)]
    finally:
        await spool.close()


async def test_size_is_counted_again_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1000)
    await spool.open()
    await append(spool, TELEMETRY, 400, 1)
    await append(spool, TELEMETRY, 400, 1)
    await spool.close()
    reopened = Spool(path, 1000)
    await reopened.open()
    try:
        _, dropped = await append(reopened, TELEMETRY, 400, 1)
        assert dropped == Dropped(1, 1, 1, 1), "the bytes already on disk count"
    finally:
        await reopened.close()


async def test_batcher_reports_a_drop_as_spool_dropped_event(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 4000)
    await spool.open()
    try:
        batcher = Batcher(spool, "agent-1", max_points=10, max_age_s=60, clock=SystemClock())
        clock = SystemClock()
        for cycle in range(12):
            batcher.add_samples("unit1", clock.now(),
                                [(f"p{i}", float(cycle * 10 + i), Quality.GOOD) for i in range(10)])
        await batcher.flush(force=True)
        assert batcher.dropped_points > 0
        # the event about a drop leaves with the next flush (and, spooled, may push out more)
        for _ in range(5):
            await batcher.flush(force=True)
            rows = await spool.peek(0, 100)
            drops = [e for r in rows if r.stream == EVENTS
                     for e in EventBatch.from_bytes(r.payload).events
                     if e.kind is EventKind.SPOOL_DROPPED]
            if sum(int(str(d.detail["points"])) for d in drops) == batcher.dropped_points:
                break
        else:
            raise AssertionError(f"spool_dropped events do not add up to "
                                 f"{batcher.dropped_points} points: {drops}")
        detail = drops[0].detail
        assert drops[0].code == "spool_full"
        kept = [TelemetryBatch.from_bytes(r.payload).seq for r in rows if r.stream == TELEMETRY]
        first, last = int(str(detail["first_seq"])), int(str(detail["last_seq"]))
        assert first == 1
        assert int(str(detail["points"])) == 10 * (last - first + 1)
        assert not set(range(first, last + 1)) & set(kept), "the dropped seqs are gone"
        assert kept == list(range(kept[0], 13)), "the newest batches are kept, in order"
    finally:
        await spool.close()


async def test_unusable_path_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spool = Spool(blocker / "spool.db", MB)
    with pytest.raises(SpoolError, match="cannot open spool"):
        await spool.open()
    await spool.close()
