"""The rollout engine: scheduled plans become `upgrade.job` commands, wave by wave.

Each scheduler tick, for every scheduled or running plan (row claimed with
`FOR UPDATE SKIP LOCKED`, so of several server processes one advances a plan at a time):

1. halt if the failed units reach `failure_threshold`, or a finished wave succeeded on fewer
   than `success_threshold` of its units (units not started are skipped: untouched);
2. complete when every unit is done;
3. else dispatch pending units of the current wave (the canary is wave 0) whose site is
   inside the confirmed window *in site-local time*, whose site has checked in (if the plan
   asks for it), within `concurrency_per_site` and `concurrency_total`.

A unit is dispatched once: its `RolloutTarget` row moves from `pending` to `dispatched` under
a row lock, in the same transaction that stores the signed command, and the (plan, unit)
pair is unique. Everything lives in the database, so a restarted server carries on where
the last one stopped. Agents answer through command acks (`on_ack`): progress stages, then
`ok` (installed), `rejected` (refused before touching the unit), or `error` (failed; after
a `rolled_back` stage, rolled back). When every target unit of a site has the release, the
ticket core closes the C/D tickets the release fixes (`release_installed`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from protocols.packages import Fixes, PrecheckLimits, UpgradeJob
from server.api.deps import id_of
from server.core.config import ServerSettings
from server.core.db import Database
from server.errors import ServerError
from server.models import Site, Unit
from server.upgrades import releases
from server.upgrades.models import ReleasePackage, RolloutTarget, SiteCheckin, UpgradePlan
from server.upgrades.plans import in_window, window_utc

log = logging.getLogger(__name__)

JobSender = Callable[[AsyncSession, Site, dict[str, Any], float], Awaitable[str]]
"""Sends one `upgrade.job` to a site's agent in the caller's transaction; the command id."""

ACTIVE = frozenset({"dispatched", "running"})
BAD = frozenset({"failed", "rolled_back", "refused"})
FINAL = BAD | {"succeeded", "skipped"}
JOB_MARGIN_S = 3600.0
"""How long after the window's end a job may still report (an install running at the end)."""


class RolloutEngine:
    """Advances plans on each tick and applies agents' answers."""

    def __init__(self, settings: ServerSettings, db: Database, send: JobSender, *,
                 clock: Clock | None = None, base_url: Callable[[], str] | None = None) -> None:
        self.settings = settings
        self.db = db
        self.send = send
        self.clock = clock or SystemClock()
        self.base_url = base_url or (lambda: f"http://{settings.http.host}:{settings.http.port}")

    async def tick(self) -> None:
        """Advance every active plan once."""
        now = self.clock.now()
        async with self.db.session() as session:
            plans = (await session.exec(
                select(UpgradePlan).where(col(UpgradePlan.state).in_(("scheduled", "running")),
                                          col(UpgradePlan.paused).is_(False))
                .order_by(col(UpgradePlan.id)).with_for_update(skip_locked=True)
            )).all()
            for plan in plans:
                await self._advance(session, plan, now)

    async def _advance(self, session: AsyncSession, plan: UpgradePlan, now: datetime) -> None:
        targets = list((await session.exec(
            select(RolloutTarget).where(RolloutTarget.plan_id == plan.id)
            .order_by(col(RolloutTarget.wave), col(RolloutTarget.id))
        )).all())
        bad = [t for t in targets if t.state in BAD]
        if len(bad) >= plan.failure_threshold:
            await halt(session, plan, f"{len(bad)} unit(s) failed (threshold "
                       f"{plan.failure_threshold}): {bad[0].device}: "
                       f"{bad[0].detail.get('error', bad[0].state)}", now, targets)
            return
        waves = sorted({t.wave for t in targets})
        current = next((w for w in waves if any(t.state not in FINAL for t in targets
                                                if t.wave == w)), None)
        for w in waves:
            if current is not None and w >= current:
                break
            in_wave = [t for t in targets if t.wave == w]
            ok = sum(t.state == "succeeded" for t in in_wave) / len(in_wave)
            if ok < plan.success_threshold:
                await halt(session, plan, f"wave {w} succeeded on {ok:.0%} of its units, below "
                           f"{plan.success_threshold:.0%}", now, targets)
                return
        if current is None:
            await self._complete(session, plan, now)
            return
        await self._dispatch(session, plan, [t for t in targets if t.wave == current],
                             targets, now)

    async def _dispatch(self, session: AsyncSession, plan: UpgradePlan,
                        wave: list[RolloutTarget], targets: list[RolloutTarget],
                        now: datetime) -> None:
        window = plan.confirmed_window
        if window is None:  # pragma: no cover - scheduled plans are confirmed
            return
        sites = {s.id: s for s in (await session.exec(
            select(Site).where(col(Site.id).in_(plan.site_ids)))).all()}
        pending_sites = {t.site_id for t in wave if t.state == "pending"}
        if pending_sites and all(window_utc(window, sites[s])[1] <= now for s in pending_sites):
            await halt(session, plan, "the confirmed window ended before every unit was "
                       "upgraded", now, targets)
            return
        checked_in = set((await session.exec(
            select(SiteCheckin.site_id).where(SiteCheckin.plan_id == plan.id))).all())
        active = Counter(t.site_id for t in targets if t.state in ACTIVE)
        total_active = sum(active.values())
        release = await session.get(ReleasePackage, plan.release_id)
        if release is None:  # pragma: no cover - foreign key
            return
        candidates = [t.id for t in wave if t.state == "pending"
                      and in_window(window, sites[t.site_id], now)
                      and (not plan.checkin_required or t.site_id in checked_in)]
        if not candidates:
            return
        claimed = (await session.exec(
            select(RolloutTarget).where(col(RolloutTarget.id).in_(candidates),
                                        RolloutTarget.state == "pending")
            .order_by(col(RolloutTarget.id)).with_for_update(skip_locked=True)
        )).all()
        for target in claimed:
            if total_active >= plan.concurrency_total:
                break
            if active[target.site_id] >= plan.concurrency_per_site:
                continue
            site = sites[target.site_id]
            job, ttl = await self._job(session, plan, release, target, site, now)
            target.command_id = await self.send(session, site, job, ttl)
            target.state, target.stage, target.dispatched_at = "dispatched", "sent", now
            session.add(target)
            active[target.site_id] += 1
            total_active += 1
            if plan.state == "scheduled":
                plan.state = "running"
                plan.updated_at = now
                session.add(plan)

    async def _job(self, session: AsyncSession, plan: UpgradePlan, release: ReleasePackage,
                   target: RolloutTarget, site: Site,
                   now: datetime) -> tuple[dict[str, Any], float]:
        assert plan.confirmed_window is not None  # noqa: S101 - checked by the caller
        start, end = window_utc(plan.confirmed_window, site)
        base = self.base_url()

        def ref(row: ReleasePackage | None) -> Any:
            return None if row is None else releases.package_ref(self.settings, base, row, now)

        delta = previous = None
        if target.from_version:
            delta = await releases.delta_package(session, release.series, target.from_version,
                                                 release.version)
            previous = await releases.full_package(session, release.series, target.from_version)
        job = UpgradeJob(
            plan_id=id_of(plan), target_id=id_of(target), device=target.device,
            rollback=plan.rollback, window_start=start, window_end=end, package=ref(release),
            delta=ref(delta), previous=ref(previous), settle_s=plan.settle_s,
            limits=PrecheckLimits.model_validate(plan.limits or {}),
        )
        ttl = (end - now).total_seconds() + JOB_MARGIN_S
        return job.model_dump(mode="json"), ttl

    async def _complete(self, session: AsyncSession, plan: UpgradePlan, now: datetime) -> None:
        plan.state = "completed"
        plan.finished_at = plan.updated_at = now
        session.add(plan)
        log.info("upgrades: plan %s completed", plan.id)
        release = await session.get(ReleasePackage, plan.release_id)
        if release is not None:  # again for every site: closing is idempotent
            for site_id in plan.site_ids:
                await _release_installed(session, release, site_id, now)
        if plan.ticket_id is not None:
            from server.tickets.service import transition

            try:
                await transition(session, plan.ticket_id, "resolved", actor="rollout",
                                 note=f"upgrade plan {plan.id} completed", now=now)
            except ServerError as exc:
                log.info("upgrades: ticket %s not resolved: %s", plan.ticket_id, exc)

    # -- answers from agents ----------------------------------------------------------------
    async def on_result(self, session: AsyncSession, command_id: str, result: str,
                        detail: dict[str, Any]) -> RolloutTarget | None:
        """Apply one ack (`progress`, `ok`, `rejected`, `error`, or `expired`) to its target."""
        plan_id = (await session.exec(select(RolloutTarget.plan_id).where(
            RolloutTarget.command_id == command_id))).first()
        if plan_id is None:
            return None
        # the plan row first (the order the tick takes), so that answers of one plan are
        # applied one after the other and the last unit of a site sees its siblings' results
        await session.exec(select(UpgradePlan.id).where(UpgradePlan.id == plan_id)
                           .with_for_update())
        target = (await session.exec(
            select(RolloutTarget).where(RolloutTarget.command_id == command_id)
            .with_for_update())).first()
        if target is None or target.state in FINAL:
            return target
        now = self.clock.now()
        stage = detail.get("stage")
        if result == "progress":
            target.stage = str(stage)[:32] if stage else target.stage
            target.state = "rolled_back" if stage == "rolled_back" else "running"
            target.detail = {**target.detail, **detail}
        elif result == "ok":
            target.state, target.stage = "succeeded", str(detail.get("outcome", "installed"))
            target.detail = {**target.detail, **detail}
            unit = await session.get(Unit, target.unit_id)
            if unit is not None:
                unit.firmware = str(detail.get("version") or target.to_version)
                session.add(unit)
        else:
            target.state = {"rejected": "refused", "expired": "failed"}.get(result, "failed")
            target.detail = {**target.detail, **detail}
            if result == "expired":
                target.detail["error"] = "the agent did not answer before the job expired"
        if target.state in FINAL:
            target.finished_at = now
        session.add(target)
        await session.flush()
        if target.state == "succeeded":
            await self._site_done(session, target, now)
        return target

    async def _site_done(self, session: AsyncSession, target: RolloutTarget,
                         now: datetime) -> None:
        """All target units of the site run the release: close the tickets it fixes."""
        states = (await session.exec(select(RolloutTarget.state).where(
            RolloutTarget.plan_id == target.plan_id,
            RolloutTarget.site_id == target.site_id))).all()
        if any(s != "succeeded" for s in states):
            return
        plan = await session.get(UpgradePlan, target.plan_id)
        release = await session.get(ReleasePackage, plan.release_id) if plan else None
        if release is not None:
            await _release_installed(session, release, target.site_id, now)


async def _release_installed(session: AsyncSession, release: ReleasePackage, site_id: int,
                             now: datetime) -> None:
    """The ticket core closes the site's C/D tickets that the release fixes."""
    from server.tickets.service import release_installed

    fixes = Fixes.model_validate(release.manifest.get("fixes") or {})
    closed = await release_installed(session, site_id=site_id, series=release.series,
                                     version=release.version, fixes=fixes.refs(), now=now)
    if closed:
        log.info("upgrades: release %s %s at site %s closed tickets %s", release.series,
                 release.version, site_id, closed)


async def halt(session: AsyncSession, plan: UpgradePlan, reason: str, now: datetime,
               targets: list[RolloutTarget] | None = None) -> None:
    """Stop a plan: units not started are skipped (left untouched); running ones finish.

    A plan none of whose units kept the release ends `rolled_back`, else `halted`.
    """
    if targets is None:
        targets = list((await session.exec(
            select(RolloutTarget).where(RolloutTarget.plan_id == plan.id))).all())
    for t in targets:
        if t.state == "pending":
            t.state, t.finished_at = "skipped", now
            session.add(t)
    states = Counter(t.state for t in targets)
    plan.state = "rolled_back" if states["rolled_back"] and not states["succeeded"] \
        else "halted"
    plan.halted_reason = reason
    plan.finished_at = plan.updated_at = now
    session.add(plan)
    log.warning("upgrades: plan %s %s: %s", plan.id, plan.state, reason)



def attach(engine: RolloutEngine, commands: Any) -> None:
    """Follow `upgrade.job` answers and expiries of a `CommandService`."""
    from protocols.messages import CommandKind

    async def on_ack(session: AsyncSession, row: Any, ack: Any) -> None:
        await engine.on_result(session, str(row.id), ack.result.value, dict(ack.detail))

    async def on_expired(session: AsyncSession, row: Any) -> None:
        await engine.on_result(session, str(row.id), "expired", {})

    commands.on_ack(CommandKind.UPGRADE_JOB, on_ack)
    commands.on_expired(CommandKind.UPGRADE_JOB, on_expired)


def command_sender(commands: Any) -> JobSender:
    """A `JobSender` over a `CommandService`: the job is signed, stored, published on commit."""
    from protocols.messages import CommandKind

    async def send(session: AsyncSession, site: Site, args: dict[str, Any], ttl: float) -> str:
        cmd = await commands.send(session, site.code, CommandKind.UPGRADE_JOB, args, ttl)
        return str(cmd.id)

    return send
