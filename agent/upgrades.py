"""The upgrade executor: one `upgrade.job` from download to a verified, healthy unit.

    job --> refuse early (signature, version policy) --> download (HTTP Range, resumable)
        --> verify hash (rebuild the image from a delta if one applies) --> keep the previous
        image --> wait for the window (agent clock) --> pre-checks --> Modbus firmware update
        --> post-checks (version, health for a settle time) --> installed
    on a failed install or post-check: reinstall the kept previous image --> rolled_back

Downloads and kept images live under `<state_dir>/upgrades/`: `downloads/<sha256>` (complete
and verified), `<sha256>.part` (a cut download, resumed with `Range: bytes=<have>-`), and
`images/<series>-<version>.img` (every image installed or downloaded, used to undo an
install and as the base a delta applies to). Units of one site share one download.

Progress goes out twice: as `progress` acks of the command (the plan shows them live) and as
`job_progress` events on the `events` topic (the timeline of the unit).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import httpx
from pydantic import ValidationError

from agent.commands import CommandRejected
from agent.coordinator import Sink
from agent.devices.modbus import ModbusLink
from agent.errors import (
    DeviceError,
    UpgradeError,
    UpgradeFailed,
    UpgradeRefused,
    UpgradeRolledBack,
)
from protocols.clock import Clock, SystemClock
from protocols.errors import PackageError
from protocols.firmware import UpdateMap, UpdateState, transfer_writes
from protocols.messages import Command, EventKind, Severity
from protocols.packages import (
    Manifest,
    PackageRef,
    PrecheckLimits,
    UpgradeJob,
    apply_delta,
    check_image,
    check_version_policy,
    verify_manifest,
    verify_payload,
)
from protocols.planner import plan_reads
from protocols.profiles import Profile
from protocols.registers import PointDef, RegisterImage, Value, decode_image
from protocols.signing import Ed25519PublicKey

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], Awaitable[None]]
HEALTHY_STATUS = frozenset({"RUNNING", "STANDBY", "DERATING"})
NON_BLOCKING_ALARMS = frozenset({"DERATING"})  # class C: degraded, not a reason to wait


class UnitAccess(Protocol):
    """What the executor needs of a unit: its name, profile, and the link to itself alone."""

    name: str
    profile: Profile

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[ModbusLink]:
        """The unit's link, with polling held off."""


@dataclass
class UpgradeOptions:
    """Timing knobs (tests shorten them)."""

    window_poll_s: float = 1.0
    state_poll_s: float = 0.2
    install_timeout_s: float = 300.0
    settle_poll_s: float = 1.0
    answer_grace_s: float = 30.0
    """After the install a unit may miss reads (a busy link, a slow restart) for this long
    before the job fails as `does not answer`; a wrong version or an alarm fails at once."""
    download_attempts: int = 8
    download_backoff_s: float = 0.5
    http_timeout_s: float = 30.0


@dataclass
class UpgradeStats:
    """Counters for health and the benchmark."""

    bytes_downloaded: int = 0
    downloads: int = 0
    resumed: int = 0
    installs: int = 0
    rollbacks: int = 0
    refused: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class UpgradeExecutor:
    """Carries out upgrade jobs on this gateway's units."""

    def __init__(
        self, state_dir: Path, release_keys: list[Ed25519PublicKey],
        units: Mapping[str, UnitAccess], sink: Sink | None = None,
        clock: Clock | None = None, options: UpgradeOptions | None = None,
    ) -> None:
        self.dir = state_dir / "upgrades"
        self.keys = release_keys
        self.units = units
        self.sink = sink
        self.clock = clock or SystemClock()
        self.options = options or UpgradeOptions()
        self.stats = UpgradeStats()
        self._locks: dict[str, asyncio.Lock] = {}
        self._unit_locks: dict[str, asyncio.Lock] = {}

    # -- the job --------------------------------------------------------------------------
    async def handle(self, cmd: Command, progress: Progress) -> dict[str, Any]:
        """The `upgrade.job` handler of the command dispatcher: a refusal is `rejected`."""
        try:
            return await self.run(cmd.args, progress)
        except UpgradeRefused as exc:
            raise CommandRejected(str(exc)) from exc

    async def run(self, args: Mapping[str, Any], progress: Progress) -> dict[str, Any]:
        """Carry out one job; the final detail, or UpgradeRefused / Failed / RolledBack."""
        try:
            job = UpgradeJob.model_validate(args)
        except ValidationError as exc:
            raise UpgradeRefused(f"malformed upgrade job: {exc.errors()[0]['msg']}") from exc
        unit = self.units.get(job.device)
        if unit is None:
            raise UpgradeRefused(f"no Modbus unit named {job.device!r} on this gateway")
        lock = self._unit_locks.setdefault(job.device, asyncio.Lock())
        if lock.locked():
            raise UpgradeRefused(f"{job.device}: another upgrade is in progress")
        async with lock:
            try:
                detail = await self._run(job, unit, _Reporter(self, job, progress))
            except UpgradeError as exc:
                key = type(exc).__name__
                self.stats.outcomes[key] = self.stats.outcomes.get(key, 0) + 1
                if isinstance(exc, UpgradeRefused):
                    self.stats.refused += 1
                raise
        self.stats.outcomes[detail["outcome"]] = self.stats.outcomes.get(detail["outcome"], 0) + 1
        return detail

    async def _run(self, job: UpgradeJob, unit: UnitAccess, report: _Reporter) -> dict[str, Any]:
        target = job.package.manifest
        try:
            verify_manifest(target, _sig(job.package), self.keys)
        except PackageError as exc:
            raise UpgradeRefused(str(exc)) from exc
        if target.series != unit.profile.series:
            raise UpgradeRefused(f"{target.name} is not for {unit.profile.series} units")
        current = await self._version(unit)
        if current == target.version:
            await report("done", version=current, note="already installed")
            return {"outcome": "already_installed", "device": job.device, "version": current}
        try:
            check_version_policy(target, current, rollback=job.rollback)
        except PackageError as exc:
            raise UpgradeRefused(str(exc)) from exc
        if self.clock.now() >= job.window_end:
            raise UpgradeRefused(f"the window ended at {job.window_end.isoformat()}")
        await report("downloading", version=target.version)
        image = await self._fetch_image(job)
        previous = await self._previous_image(job, unit.profile.series, current)
        await report("downloaded", size=len(image), kept_previous=previous is not None)
        await self._wait_for_window(job, report)
        await report("prechecks")
        problems = await self._prechecks(unit, job.limits)
        if problems:
            raise UpgradeFailed(f"pre-checks failed, nothing installed: {'; '.join(problems)}")
        if self.clock.now() >= job.window_end:
            raise UpgradeRefused(f"the window ended at {job.window_end.isoformat()}")
        await report("installing", version=target.version)
        try:
            await self._install(unit, image, target.version)
            await report("postchecks", settle_s=job.settle_s)
            await self._postchecks(unit, target.version, job.settle_s)
        except UpgradeFailed as exc:
            await self._roll_back(unit, job, previous, current, str(exc), report)
        self.stats.installs += 1
        await report("installed", version=target.version)
        return {"outcome": "installed", "device": job.device, "version": target.version,
                "previous": current}

    async def _roll_back(self, unit: UnitAccess, job: UpgradeJob, previous: bytes | None,
                         old: str, reason: str, report: _Reporter) -> NoReturn:
        if previous is None:
            raise UpgradeFailed(f"{reason}; no previous image kept, cannot roll back")
        await report("rolling_back", version=old, reason=reason)
        try:
            await self._install(unit, previous, old)
            await self._postchecks(unit, old, job.settle_s)
        except UpgradeFailed as exc:
            raise UpgradeFailed(f"{reason}; the rollback to {old} failed too: {exc}") from exc
        self.stats.rollbacks += 1
        await report("rolled_back", version=old, reason=reason)
        raise UpgradeRolledBack(f"rolled back to {old}: {reason}")

    # -- packages ---------------------------------------------------------------------------
    async def _fetch_image(self, job: UpgradeJob) -> bytes:
        """The verified full image: rebuilt from a delta if we hold its base, else downloaded."""
        target = job.package.manifest
        kept = await self._kept(target.version, target.series)
        if kept is not None and _sha(kept) == target.image_sha256:
            return kept
        delta = job.delta
        if delta is not None:
            base = await self._kept(delta.manifest.base_version, target.series)
            if base is not None and _sha(base) == delta.manifest.base_sha256:
                try:
                    verify_manifest(delta.manifest, _sig(delta), self.keys)
                    patch = await self._download(delta)
                    image = await asyncio.to_thread(apply_delta, delta.manifest, base, patch)
                except PackageError as exc:
                    raise UpgradeRefused(str(exc)) from exc
                await self._keep(target, image)
                return image
        return await self._full(job.package)

    async def _full(self, ref: PackageRef) -> bytes:
        m = ref.manifest
        kept = await self._kept(m.version, m.series)
        if kept is not None and _sha(kept) == m.image_sha256:
            return kept
        payload = await self._download(ref)
        try:
            check_image(m, payload)
        except PackageError as exc:
            raise UpgradeRefused(str(exc)) from exc
        await self._keep(m, payload)
        return payload

    async def _previous_image(self, job: UpgradeJob, series: str, current: str) -> bytes | None:
        kept = await self._kept(current, series)
        if kept is not None:
            return kept
        prev = job.previous
        if prev is None or prev.manifest.version != current or prev.manifest.kind != "full":
            return None
        try:
            verify_manifest(prev.manifest, _sig(prev), self.keys)
        except PackageError as exc:
            raise UpgradeRefused(f"the previous version's package: {exc}") from exc
        return await self._full(prev)

    async def _kept(self, version: str | None, series: str) -> bytes | None:
        if version is None:
            return None
        path = self.dir / "images" / f"{series}-{version}.img"
        return await asyncio.to_thread(_read_if_exists, path)

    async def _keep(self, manifest: Manifest, image: bytes) -> None:
        path = self.dir / "images" / f"{manifest.series}-{manifest.version}.img"
        await asyncio.to_thread(_write_atomic, path, image)

    async def _download(self, ref: PackageRef) -> bytes:
        """The payload, verified against the signed manifest; resumes a cut download."""
        m = ref.manifest
        lock = self._locks.setdefault(m.sha256, asyncio.Lock())
        async with lock:  # units of one site share one download
            done = self.dir / "downloads" / m.sha256
            data = await asyncio.to_thread(_read_if_exists, done)
            if data is not None:
                return data
            part = done.with_suffix(".part")
            await self._fetch(ref.url, part, m.size)
            data = await asyncio.to_thread(part.read_bytes)
            try:
                verify_payload(m, data)
            except PackageError as exc:
                await asyncio.to_thread(part.unlink, True)
                raise UpgradeRefused(str(exc)) from exc
            await asyncio.to_thread(os.replace, part, done)
            self.stats.downloads += 1
            return data

    async def _fetch(self, url: str, part: Path, size: int) -> None:
        opts = self.options
        await asyncio.to_thread(part.parent.mkdir, parents=True, exist_ok=True)
        last = "no attempt"
        async with httpx.AsyncClient(timeout=opts.http_timeout_s) as http:
            for attempt in range(opts.download_attempts):
                have = await asyncio.to_thread(_size, part)
                if have >= size:
                    return
                try:
                    await self._fetch_once(http, url, part, have)
                    continue
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    log.info("upgrades: download cut at %d bytes (%s); resuming", have, last)
                await asyncio.sleep(min(opts.download_backoff_s * 2**attempt, 30.0))
        if await asyncio.to_thread(_size, part) < size:
            raise UpgradeFailed(f"download of {url.split('?')[0]} failed: {last}")

    async def _fetch_once(self, http: httpx.AsyncClient, url: str, part: Path, have: int) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with http.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 206 and have:
                self.stats.resumed += 1
                mode = "ab"
            elif resp.status_code == 200:
                mode = "wb"
            else:
                body = (await resp.aread())[:200].decode("utf-8", "replace")
                raise UpgradeFailed(f"the server refused the download [{resp.status_code}]: "
                                    f"{body}")
            f = await asyncio.to_thread(open, part, mode)
            try:
                async for chunk in resp.aiter_raw():  # as received: a cut keeps what came
                    self.stats.bytes_downloaded += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
            finally:
                await asyncio.to_thread(f.close)

    # -- window and checks ------------------------------------------------------------------
    async def _wait_for_window(self, job: UpgradeJob, report: _Reporter) -> None:
        if self.clock.now() < job.window_start:
            await report("waiting_for_window", window_start=job.window_start.isoformat())
        while (now := self.clock.now()) < job.window_start:
            left = (job.window_start - now).total_seconds()
            await asyncio.sleep(min(self.options.window_poll_s, left))
        if self.clock.now() >= job.window_end:
            raise UpgradeRefused(f"the window ended at {job.window_end.isoformat()}")

    async def _version(self, unit: UnitAccess) -> str:
        values = await self._read(unit, ("emu.FwVer",))
        version = values.get("emu.FwVer")
        if not isinstance(version, str) or not version:
            raise UpgradeFailed(f"{unit.name}: cannot read the running firmware version")
        return version

    async def _read(self, unit: UnitAccess, names: tuple[str, ...]) -> dict[str, Value | None]:
        async with unit.exclusive() as link:
            return await read_points(link, unit.profile, names)

    async def _prechecks(self, unit: UnitAccess, limits: PrecheckLimits) -> list[str]:
        names = ("emu.Status", "emu.Alarm", "battery.SoC", "inverter_three_phase.W")
        try:
            v = await self._read(unit, names)
        except DeviceError as exc:
            return [f"unit does not answer: {exc}"]
        problems = health_problems(unit.profile, v)
        soc = v.get("battery.SoC")
        if isinstance(soc, float | int) and not limits.soc_min <= soc <= limits.soc_max:
            problems.append(f"state of charge {soc:.0f} % outside {limits.soc_min:g}-"
                            f"{limits.soc_max:g} %")
        w = v.get("inverter_three_phase.W")
        if isinstance(w, float | int) and abs(w) > limits.max_power_w:
            problems.append(f"power {w:.0f} W beyond +-{limits.max_power_w:g} W")
        return problems

    async def _install(self, unit: UnitAccess, image: bytes, version: str) -> None:
        """Send the image with the Modbus update protocol; wait for DONE through the reboot."""
        m = UpdateMap.of(unit.profile)
        loop = asyncio.get_running_loop()
        async with unit.exclusive() as link:
            try:
                if not link.connected:
                    await link.connect()
                for write in transfer_writes(unit.profile, image):
                    await link.write(write.address, write.registers)
            except DeviceError as exc:
                raise UpgradeFailed(f"{unit.name}: transfer failed: {exc}") from exc
            deadline = loop.time() + self.options.install_timeout_s
            while loop.time() < deadline:
                await asyncio.sleep(self.options.state_poll_s)
                try:
                    if not link.connected:
                        await link.connect()
                    v = await read_points(link, unit.profile, (m.state.name, m.error.name))
                except DeviceError:
                    link.close()  # rebooting: reconnect next time round
                    continue
                state = UpdateState(int(v.get(m.state.name) or 0))
                if state is UpdateState.DONE:
                    return
                if state.final:
                    raise UpgradeFailed(f"{unit.name}: the unit ended the update in {state.name}"
                                        f" (error {v.get(m.error.name)})")
        raise UpgradeFailed(f"{unit.name}: no final update state within "
                            f"{self.options.install_timeout_s:g} s")

    async def _postchecks(self, unit: UnitAccess, version: str, settle_s: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + settle_s
        answer_by = loop.time() + max(settle_s, self.options.answer_grace_s)
        while True:
            try:
                v = await self._read(unit, ("emu.FwVer", "emu.Status", "emu.Alarm"))
            except DeviceError as exc:
                if loop.time() >= answer_by:
                    raise UpgradeFailed(f"{unit.name} does not answer after the install: "
                                        f"{exc}") from exc
                await asyncio.sleep(self.options.settle_poll_s)
                continue
            if v.get("emu.FwVer") != version:
                raise UpgradeFailed(f"{unit.name} runs {v.get('emu.FwVer')}, not {version}")
            problems = health_problems(unit.profile, v)
            if problems:
                raise UpgradeFailed(f"{unit.name} unhealthy after the install: "
                                    f"{'; '.join(problems)}")
            left = end - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(self.options.settle_poll_s, left))


class _Reporter:
    """Sends a stage as a progress ack and as a `job_progress` event."""

    def __init__(self, ex: UpgradeExecutor, job: UpgradeJob, progress: Progress) -> None:
        self.ex, self.job, self.progress = ex, job, progress

    async def __call__(self, stage: str, **detail: Any) -> None:
        body = {"stage": stage, "plan_id": self.job.plan_id, "target_id": self.job.target_id,
                "device": self.job.device, **detail}
        if self.ex.sink is not None:
            severity = Severity.WARNING if stage in ("rolling_back", "rolled_back") \
                else Severity.INFO
            self.ex.sink.add_event(self.ex.clock.now(), EventKind.JOB_PROGRESS, self.job.device,
                                   f"upgrade.{stage}", severity, body)
        await self.progress(body)


def health_problems(profile: Profile, values: Mapping[str, Value | None]) -> list[str]:
    """Why a unit is not healthy (status, blocking alarm bits), from its profile's symbols."""
    problems = []
    status = values.get("emu.Status")
    names = profile.point("emu.Status").symbol_map()
    if isinstance(status, int) and names.get(status, str(status)) not in HEALTHY_STATUS:
        problems.append(f"status {names.get(status, status)}")
    alarm = values.get("emu.Alarm")
    if isinstance(alarm, int) and alarm:
        bits = profile.point("emu.Alarm").symbol_map()
        active = [n for b, n in bits.items() if alarm >> b & 1 and n not in NON_BLOCKING_ALARMS]
        if active:
            problems.append(f"alarms {', '.join(active)}")
    return problems


async def read_points(link: ModbusLink, profile: Profile,
                      names: tuple[str, ...]) -> dict[str, Value | None]:
    """Read and decode some points of a unit (with their scale factors)."""
    points: list[PointDef] = []
    for name in names:
        try:
            p = profile.point(name)
        except KeyError:
            continue
        points.append(p)
        if p.sf:
            points.append(profile.point(p.sf))
    if not link.connected:
        await link.connect()
    image = RegisterImage()
    for req in plan_reads(points, max_gap=profile.max_gap):
        image.put(req.table, req.address, await link.read(req.table, req.address, req.count))
    return {k: r.value for k, r in decode_image(points, image).items()}


def _sig(ref: PackageRef) -> bytes | None:
    if ref.signature is None:
        return None
    try:
        return base64.b64decode(ref.signature, validate=True)
    except ValueError:
        return b"\0"  # fails verification with a clear message


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_if_exists(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{secrets.token_hex(6)}.tmp")  # units of a site may keep at once
    tmp.write_bytes(data)
    os.replace(tmp, path)

