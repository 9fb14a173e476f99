"""One coordinator per Modbus unit: polls on a fixed schedule and hands typed samples on.

A cycle reads the planner's requests, decodes them through the profile, and gives every
point a quality: `good`, `out_of_range` (outside the profile's range), `stale` (its request
failed this cycle, so the last good value is repeated) or `comm_lost` (the unit has missed
`comm_loss_after` cycles). Alarm-bit and state changes become events. A failure marks the
unit unavailable and is counted; it never ends the loop, and a slow cycle skips the slots it
overran instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from agent.config import DeviceSettings
from agent.devices.modbus import ModbusLink
from agent.errors import CommError, DeviceError, ReplyError
from protocols.clock import Clock, SystemClock
from protocols.decoder import CompiledDecoder
from protocols.messages import EventKind, Quality, Severity
from protocols.planner import ReadRequest, plan_reads
from protocols.profiles import Profile
from protocols.registers import PointDef, PointType, Value

log = logging.getLogger(__name__)

Sample = tuple[str, Value | None, Quality]
_ALARM_TYPES = (PointType.BITFIELD16, PointType.BITFIELD32)
_STATE_TYPES = (PointType.ENUM16, PointType.ENUM32)
_NOT_TELEMETRY = (PointType.SUNSSF, PointType.PAD)


def change_events(
    sink: Sink, device: str, ts: datetime, p: PointDef, old: Value | None, value: Value
) -> None:
    """Alarm bits that rose or fell, and state enums that changed, since the last reading."""
    if old is None or old == value or not p.symbols:
        return
    names = p.symbol_map()
    if p.type in _ALARM_TYPES and isinstance(old, int) and isinstance(value, int):
        for bit, name in names.items():
            was, now = bool(old >> bit & 1), bool(value >> bit & 1)
            if was != now:
                sink.add_event(
                    ts, EventKind.ALARM_RAISED if now else EventKind.ALARM_CLEARED,
                    device, name, Severity.ALARM if now else Severity.INFO, {"point": p.name},
                )
    elif p.type in _STATE_TYPES and isinstance(value, int):
        sink.add_event(
            ts, EventKind.STATE_CHANGED, device, names.get(value, str(value)), Severity.INFO,
            {"point": p.name, "from": names.get(int(old), old), "to": names.get(value, value)},
        )


class Sink(Protocol):
    """Where samples and events go (the batcher)."""

    def add_samples(self, device: str, ts: datetime, samples: Iterable[Sample]) -> None:
        """Accept one cycle's samples of one device."""

    def add_event(
        self, ts: datetime, kind: EventKind, device: str | None, code: str | None = None,
        severity: Severity = Severity.INFO, detail: dict[str, Any] | None = None,
    ) -> None:
        """Accept one event."""


@dataclass
class DeviceStats:
    """Counters per unit, for health and `emu agent status`."""

    cycles: int = 0
    failed_cycles: int = 0
    skipped_slots: int = 0
    reads: int = 0
    timeouts: int = 0
    exceptions: int = 0
    malformed: int = 0
    errors: int = 0
    points: int = 0
    last_error: str | None = None
    reads_per_cycle: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dict(self.__dict__)


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float = 0.5
    cap: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The wait before the next attempt."""
        self.attempts += 1
        return self.rng.uniform(0, min(self.cap, self.base * 2 ** min(self.attempts, 16)))

    def reset(self) -> None:
        """After a success."""
        self.attempts = 0


class ModbusCoordinator:
    """Polls one unit through one `ModbusLink`."""

    def __init__(
        self,
        device: DeviceSettings,
        profile: Profile,
        link: ModbusLink,
        sink: Sink,
        clock: Clock | None = None,
        backoff_cap_s: float = 30.0,
    ) -> None:
        self.device = device
        self.name = device.name
        self.link = link
        self.sink = sink
        self.clock = clock or SystemClock()
        self.stats = DeviceStats()
        self.backoff = Backoff(cap=backoff_cap_s)
        self.comm_lost = False
        self.stopping = False  # checked each cycle, in case a cancellation gets swallowed
        self._failures = 0
        self._retry_at = 0.0
        self._last: dict[str, Value | None] = {}
        self._busy = asyncio.Lock()  # a poll cycle, or an upgrade that has the unit to itself
        self.set_profile(profile)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[ModbusLink]:
        """The unit's link with polling held off (a firmware install must not interleave
        with reads, and a rebooting unit must not count as lost communication)."""
        async with self._busy:
            yield self.link

    def set_profile(self, profile: Profile) -> None:
        """Plan the reads for a profile (also after SunSpec discovery)."""
        self.profile = profile
        gap = self.device.max_gap if self.device.max_gap is not None else profile.max_gap
        self.points: tuple[PointDef, ...] = profile.poll_points
        self.plan: list[ReadRequest] = plan_reads(self.points, max_gap=gap)
        self._decoder = CompiledDecoder.for_plan(self.points, self.plan)
        self._by_name = {p.name: p for p in self.points}
        self.stats.reads_per_cycle = len(self.plan)

    async def run(self, phase_s: float = 0.0) -> None:
        """Poll on a fixed schedule (start + phase + k * interval) until stopped.

        The agent gives each unit its own phase so that a hundred units do not all fire
        their reads, and their batches, in the same instant.
        """
        loop = asyncio.get_running_loop()
        interval = self.device.poll_interval_s
        if phase_s > 0:
            await asyncio.sleep(phase_s)
        next_at = loop.time()
        while not self.stopping:
            async with self._busy:
                ok = await self.poll_once()
            next_at += interval
            now = loop.time()
            if now > next_at:
                missed = math.ceil((now - next_at) / interval)
                self.stats.skipped_slots += missed
                next_at += missed * interval
                if not ok:
                    await self._failed(missed)  # the slots a dead unit ate count as failures
            await asyncio.sleep(next_at - now)

    async def poll_once(self) -> bool:
        """One cycle; True if the unit answered. Never raises (but for cancellation)."""
        self.stats.cycles += 1
        ts = self.clock.now()
        try:
            image, failed = await self._read_all()
        except CommError as exc:
            self._note(exc)
            self.link.close()
            await self._failed(1)
            return False
        except Exception as exc:  # a bug must not end the loop
            log.exception("%s: unexpected error in a poll cycle", self.name)
            self.stats.errors += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            await self._failed(1)
            return False
        self._answered(ts)
        self._emit(ts, image, failed)
        return True

    async def _connect(self) -> None:
        """Connect if needed, respecting the reconnect backoff."""
        if self.link.connected:
            return
        now = asyncio.get_running_loop().time()
        if now < self._retry_at:
            raise CommError(f"{self.link.where}: waiting to reconnect")
        try:
            await self.link.connect()
        except CommError:
            self._retry_at = now + self.backoff.next_delay()
            raise
        self.backoff.reset()

    async def _read_all(self) -> tuple[list[list[int] | None], set[str]]:
        await self._connect()
        responses: list[list[int] | None] = []  # per request of the plan; None if it failed
        failed: set[str] = set()
        for req in self.plan:
            self.stats.reads += 1
            try:
                regs = await self.link.read(req.table, req.address, req.count)
            except ReplyError as exc:
                self._note(exc)
                failed.update(req.points)
                responses.append(None)
                continue
            responses.append(regs)
        if failed and len(failed) == len(self.points):
            raise CommError(f"{self.link.where}: every read of the cycle failed")
        return responses, failed

    def _note(self, exc: DeviceError) -> None:
        self.stats.last_error = str(exc)
        if isinstance(exc, ReplyError):
            if exc.exception_code is None:
                self.stats.malformed += 1
            else:
                self.stats.exceptions += 1
            log.info("%s", exc)
        else:
            self.stats.timeouts += 1
            log.debug("%s", exc)

    async def _failed(self, cycles: int) -> None:
        self.stats.failed_cycles += cycles
        self._failures += cycles
        if not self.comm_lost and self._failures >= self.device.comm_loss_after:
            self.comm_lost = True
            ts = self.clock.now()
            self.sink.add_event(
                ts, EventKind.COMM_LOST, self.name, "comm_lost", Severity.ALARM,
                {"failed_cycles": self._failures, "last_error": self.stats.last_error},
            )
            self.sink.add_samples(
                self.name, ts,
                ((p.name, None, Quality.COMM_LOST) for p in self.points
                 if p.type not in _NOT_TELEMETRY),
            )
            log.warning("%s: communication lost (%s)", self.name, self.stats.last_error)

    def _answered(self, ts: datetime) -> None:
        if self.comm_lost:
            self.comm_lost = False
            self.sink.add_event(ts, EventKind.COMM_RESTORED, self.name, "comm_lost",
                                Severity.INFO, {"failed_cycles": self._failures})
            log.warning("%s: communication restored", self.name)
        self._failures = 0

    def _emit(
        self, ts: datetime, responses: Sequence[Sequence[int] | None], failed: set[str]
    ) -> None:
        bad: list[str] = []
        readings = self._decoder.decode(responses, errors=bad)
        if bad:
            self.stats.malformed += len(bad)
            self.stats.last_error = f"undecodable registers for {', '.join(bad[:5])}"
            log.info("%s: %s", self.name, self.stats.last_error)
        samples: list[Sample] = []
        for p in self.points:
            if p.type in _NOT_TELEMETRY:
                continue
            r = readings.get(p.name)
            if r is None:
                if p.name in failed and self._last.get(p.name) is not None:
                    samples.append((p.name, self._last[p.name], Quality.STALE))
                continue
            if r.value is None:
                continue  # "not implemented" on this unit
            change_events(self.sink, self.name, ts, p, self._last.get(p.name), r.value)
            self._last[p.name] = r.value
            samples.append((p.name, r.value, Quality.OUT_OF_RANGE if r.out_of_range
                            else Quality.GOOD))
        self.stats.points += len(samples)
        self.sink.add_samples(self.name, ts, samples)
