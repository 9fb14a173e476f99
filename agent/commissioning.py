"""Remote commissioning on the site: find the units, read their nameplates, run the checks.

`CommissioningRunner.run(CheckRequest)` probes every (address, unit id) of the request's
targets, a bounded number at a time, each over its own Modbus TCP connection so that a silent
id costs one timeout and delays no other. An id that answers is walked as SunSpec
(`DiscoveringCoordinator`), its model name matched to a shipped profile, then read once in
full with that profile (`ModbusCoordinator`, the same reads and decoding as daily polling) and
judged by `protocols.commissioning.evaluate_unit`. The result is a `CheckOutcome` with one
`UnitFinding` per unit that answered, evidence included; comparing it with the plan (missing
and unexpected units) and judging the gateway clock is the server's job.

The runner is the handler of the `commissioning.check` command (`handler`, registered by
`Agent`), and works on its own for tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from agent.commands import CommandRejected
from agent.config import DeviceSettings
from agent.coordinator import ModbusCoordinator
from agent.devices.discovery import DiscoveringCoordinator
from agent.devices.modbus import ModbusLink
from agent.errors import CommError, ReplyError
from protocols.clock import Clock, SystemClock
from protocols.commissioning import (
    CheckOutcome,
    CheckRequest,
    CheckResult,
    Requirements,
    Target,
    UnitFinding,
    evaluate_unit,
    parse_unit_ids,
)
from protocols.messages import Command, EventKind, Quality, Severity
from protocols.profiles import Profile, all_profiles
from protocols.registers import Table, Value
from protocols.sunspec import DEFAULT_BASES, SUNS_MARKER

log = logging.getLogger(__name__)

READ_ATTEMPTS = 2
Progress = Callable[[dict[str, Any]], Awaitable[None]]


class _Readings:
    """A `Sink` that keeps the last good value of each point (one full read of one unit)."""

    def __init__(self) -> None:
        self.values: dict[str, Value | None] = {}

    def add_samples(
        self, device: str, ts: datetime, samples: Iterable[tuple[str, Value | None, Quality]]
    ) -> None:
        """Keep values read fine or out of the profile's valid range (still evidence)."""
        for name, value, quality in samples:
            if quality in (Quality.GOOD, Quality.OUT_OF_RANGE):
                self.values[name] = value

    def add_event(
        self, ts: datetime, kind: EventKind, device: str | None, code: str | None = None,
        severity: Severity = Severity.INFO, detail: dict[str, Any] | None = None,
    ) -> None:
        """Events (alarm edges) are not needed: the alarm check reads the alarm register."""


@dataclass(frozen=True)
class _Refused:
    """An address that answered, but showed no SunSpec map."""

    host: str
    port: int
    unit_id: int
    why: str | None = None

    @staticmethod
    def summarise(refused: Sequence[_Refused]) -> tuple[str, ...]:
        """One note per address: which unit ids answered without a SunSpec map."""
        by_place: dict[tuple[str, int], list[_Refused]] = {}
        for r in refused:
            by_place.setdefault((r.host, r.port), []).append(r)
        notes = []
        for (host, port), items in by_place.items():
            ids = ", ".join(str(r.unit_id) for r in sorted(items, key=lambda r: r.unit_id))
            whys = sorted({r.why for r in items if r.why})
            notes.append(f"{host}:{port} unit id(s) {ids} answered without a SunSpec map"
                         + (f" ({'; '.join(whys)})" if whys else ""))
        return tuple(notes)


class CommissioningRunner:
    """Runs `commissioning.check` requests against the units of this site."""

    def __init__(self, clock: Clock | None = None,
                 profiles: Sequence[Profile] | None = None,
                 devices: Sequence[DeviceSettings] = ()) -> None:
        self.clock = clock or SystemClock()
        self.profiles = list(profiles if profiles is not None else all_profiles())
        self.names = {(d.host, d.port, d.unit_id): d.name for d in devices
                      if d.protocol == "modbus-tcp"}
        """The agent's own device names by address, so that the server registers a unit
        under the name its telemetry will carry."""

    def profile_for(self, model: str | None) -> Profile | None:
        """The shipped profile whose model name the unit reports, if any."""
        return next((p for p in self.profiles if model and p.model == model), None)

    async def run(self, request: CheckRequest, progress: Progress | None = None) -> CheckOutcome:
        """Probe every target address and unit id, and check the units that answer."""
        started = self.clock.now()
        addresses = [(t, uid) for t in request.targets for uid in parse_unit_ids(t.unit_ids)]
        gate = asyncio.Semaphore(request.concurrency)
        done = 0

        async def probe(target: Target, unit_id: int) -> UnitFinding | _Refused | None:
            nonlocal done
            async with gate:
                try:
                    return await self._probe(request, target, unit_id)
                finally:
                    done += 1
                    if progress is not None and (done % 10 == 0 or done == len(addresses)):
                        await progress({"probed": done, "of": len(addresses)})

        results = await asyncio.gather(*(probe(t, uid) for t, uid in addresses))
        units = tuple(r for r in results if isinstance(r, UnitFinding))
        notes = _Refused.summarise([r for r in results if isinstance(r, _Refused)])
        log.info("commissioning plan %d: %d unit(s) found at %d address(es)",
                 request.plan_id, len(units), len(addresses))
        return CheckOutcome(
            plan_id=request.plan_id, run_id=request.run_id, started_at=started,
            finished_at=self.clock.now(), agent_time=self.clock.now(), probed=len(addresses),
            units=units, notes=notes,
        )

    async def _probe(
        self, request: CheckRequest, target: Target, unit_id: int
    ) -> UnitFinding | _Refused | None:
        """One address: None if nothing answers, `_Refused` if it answers every SunSpec base
        with a Modbus exception (an empty id behind a gateway), else a finding."""
        device = DeviceSettings(
            name=f"commissioning-{unit_id}", protocol="modbus-tcp", profile="sunspec",
            host=target.host, port=target.port, unit_id=unit_id,
            timeout_s=request.timeout_s, retries=0, comm_loss_after=100,
        )
        link = ModbusLink(device)
        try:
            try:
                await link.connect()
                if not await self._has_marker(link):
                    return _Refused(target.host, target.port, unit_id)
            except CommError:
                return None
            walker = DiscoveringCoordinator(device, link, _Readings(), self.clock)
            if not await walker.discover():
                return _Refused(target.host, target.port, unit_id, walker.stats.last_error)
            return await self._check_unit(request, device, link, walker)
        finally:
            link.close()

    @staticmethod
    async def _has_marker(link: ModbusLink) -> bool:
        """Whether a SunS marker sits at one of the SunSpec bases (CommError if silent)."""
        for base in DEFAULT_BASES:
            try:
                if tuple(await link.read(Table.HOLDING, base, 2)) == SUNS_MARKER:
                    return True
            except ReplyError:
                continue
        return False

    async def _check_unit(
        self, request: CheckRequest, device: DeviceSettings, link: ModbusLink,
        walker: DiscoveringCoordinator,
    ) -> UnitFinding:
        discovered = walker.discovered
        assert discovered is not None  # noqa: S101 - checked by the caller
        base = {"host": device.host or "", "port": device.port, "unit_id": device.unit_id,
                "device": self.names.get((device.host, device.port, device.unit_id)),
                "manufacturer": discovered.manufacturer, "model": discovered.model,
                "chain": walker.chain}
        profile = self.profile_for(discovered.model)
        if profile is None:
            return UnitFinding(series=None, **base, checks=(CheckResult(
                check="nameplate", passed=False,
                detail=f"model {discovered.model!r} matches no EMU profile",
                evidence={"manufacturer": discovered.manufacturer, "model": discovered.model,
                          "chain": list(walker.chain)}),))
        readings = _Readings()
        reader = ModbusCoordinator(device, profile, link, readings, self.clock)
        answered = False
        for _ in range(READ_ATTEMPTS):  # one lost answer is not a failed commissioning
            answered = await reader.poll_once()
            if answered:
                break
        stats = reader.stats
        failed = len(reader.plan) if not answered else stats.exceptions + stats.malformed
        values = readings.values
        requirements = request.requirements.get(profile.series) or Requirements.of(profile)
        checks = evaluate_unit(profile, values, requirements, chain=walker.chain,
                               reads=len(reader.plan), failed=failed, error=stats.last_error)

        def text(name: str) -> str | None:
            value = values.get(name)
            return str(value) if value not in (None, "") else None

        return UnitFinding(
            series=profile.series, **{**base, "model": text("common.Md") or discovered.model},
            serial=text("common.SN"), firmware=text("emu.FwVer") or text("common.Vr"),
            checks=tuple(checks),
        )

    async def handle(self, args: dict[str, Any], progress: Progress | None = None
                     ) -> dict[str, Any]:
        """Validated arguments in, the outcome as JSON out (CommandRejected for bad args)."""
        try:
            request = CheckRequest.model_validate(args)
        except ValidationError as exc:
            raise CommandRejected(f"not a commissioning check: {exc}") from exc
        outcome = await self.run(request, progress)
        return outcome.model_dump(mode="json")

    async def handler(self, cmd: Command, progress: Progress) -> dict[str, Any]:
        """The `commissioning.check` handler for `Agent.commands`."""
        return await self.handle(dict(cmd.args), progress)
