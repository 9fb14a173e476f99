"""Batching: samples and events become `emu/v1/{site}/telemetry|events` batches in the spool.

A telemetry batch is closed when it holds `batch_max_points` or its oldest sample is
`batch_max_age_s` old; events go out at least as fast. The JSON is built directly (the
schemas in `protocols.messages` describe it and the tests validate it), because this is the
agent's hot path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from agent.spool import Dropped, Spool
from protocols.clock import Clock, SystemClock
from protocols.messages import Encoding, EventKind, Quality, Severity
from protocols.registers import Value

log = logging.getLogger(__name__)
TELEMETRY = "telemetry"
EVENTS = "events"


def iso(ts: datetime) -> str:
    """UTC ISO-8601 with milliseconds and `Z`, as the schemas want."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _wire_value(value: Value | None) -> Value | None:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


class Batcher:
    """Collects samples and events, writes batches to the spool."""

    def __init__(
        self,
        spool: Spool,
        agent: str,
        *,
        max_points: int = 1000,
        max_age_s: float = 1.0,
        compress: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self.spool = spool
        self.agent = agent
        self.max_points = max_points
        self.max_age_s = max_age_s
        self.compress = compress
        self.clock = clock or SystemClock()
        self._points: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._oldest: float | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.points_in = 0
        self.batches = 0
        self.dropped_points = 0
        self.on_batch: Callable[[], None] | None = None  # the uplink's wake-up

    # -- Sink -----------------------------------------------------------------------------
    def add_samples(
        self, device: str, ts: datetime, samples: Iterable[tuple[str, Value | None, Quality]]
    ) -> None:
        """Queue one cycle of one device."""
        stamp = iso(ts)
        before = len(self._points)
        self._points.extend(
            {"device": device, "point": point, "ts": stamp, "value": _wire_value(value),
             "quality": quality.value}
            for point, value, quality in samples
        )
        added = len(self._points) - before
        self.points_in += added
        if added and self._oldest is None:
            self._oldest = self.clock.monotonic()
        if len(self._points) >= self.max_points:
            self._wake.set()

    def add_event(
        self, ts: datetime, kind: EventKind, device: str | None, code: str | None = None,
        severity: Severity = Severity.INFO, detail: dict[str, Any] | None = None,
    ) -> None:
        """Queue one event; it leaves with the next flush."""
        self._events.append({"ts": iso(ts), "kind": kind.value, "device": device, "code": code,
                             "severity": severity.value, "detail": detail or {}})
        self._wake.set()

    # -- flushing -------------------------------------------------------------------------
    async def run(self) -> None:
        """Flush whenever a batch is full, events are waiting, or the oldest sample is due."""
        while True:
            timeout = self.max_age_s
            if self._oldest is not None:
                timeout = max(0.0, self._oldest + self.max_age_s - self.clock.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: it can eat a cancel (3.11)
                    await self._wake.wait()
            self._wake.clear()
            await self.flush(force=False)

    async def flush(self, force: bool = True) -> None:
        """Write what is due (everything, if `force`) to the spool."""
        async with self._lock:
            if self._events:
                events, self._events = self._events, []
                await self._write(EVENTS, "events", events)
            due = force or (
                self._oldest is not None
                and self.clock.monotonic() - self._oldest >= self.max_age_s
            )
            while self._points and (due or len(self._points) >= self.max_points):
                chunk = self._points[: self.max_points]
                del self._points[: self.max_points]
                await self._write(TELEMETRY, "points", chunk)
            if not self._points:
                self._oldest = None

    async def _write(self, stream: str, key: str, items: list[dict[str, Any]]) -> None:
        def make(seq: int) -> bytes:
            doc = {"agent": self.agent, "seq": seq, "sent_at": iso(self.clock.now()), key: items}
            raw = json.dumps(doc, separators=(",", ":")).encode()
            if not self.compress or stream != TELEMETRY:
                return raw
            body = base64.b64encode(zlib.compress(raw)).decode("ascii")
            return json.dumps({"encoding": Encoding.ZLIB_JSON.value, "body": body}).encode()

        _, dropped = await self.spool.append(stream, make, len(items))
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch()
        if dropped is not None:
            self._report_drop(dropped)

    def _report_drop(self, dropped: Dropped) -> None:
        self.dropped_points += dropped.points
        log.warning("spool full: dropped %d batches (%d points, seq %d-%d)", dropped.batches,
                    dropped.points, dropped.first_seq, dropped.last_seq)
        self.add_event(
            self.clock.now(), EventKind.SPOOL_DROPPED, None, "spool_full", Severity.WARNING,
            {"batches": dropped.batches, "points": dropped.points,
             "first_seq": dropped.first_seq, "last_seq": dropped.last_seq},
        )
