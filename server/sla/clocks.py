"""SLA clocks of a ticket: start, pause, resume, stop, and the due timers they keep.

A clock runs on its calendar; `consumed_s` is the service time used up to `running_since`.
Whenever a clock changes, `_reschedule` rewrites its unfired timers: a warning at
`warn_fraction` of the target, the breach at 100 % and the escalation (to the manager) at
`escalate_fraction`; a paused or stopped clock's timers have no due time. Timers that have
fired are never rewritten, so each warning, breach and escalation happens once per clock.
These functions never commit: they run in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.models import Site
from server.sla.calendar import calendar_from_spec
from server.sla.models import SlaClock, SlaContract, SlaTimer
from server.sla.policy import CLOCK_KINDS, SlaTerms, resolve_terms

__all__ = ["CLOCK_KINDS", "PAUSE_REASONS", "TIMER_KINDS"]

TIMER_KINDS = ("warning", "breach", "escalation")
PAUSE_REASONS = frozenset({"consent", "window", "personnel", "customer"})

_server_terms: dict[str, Any] = {}


def configure(server_terms: Mapping[str, Any] | None) -> None:
    """The server settings' `[sla]` overrides (one process, one configuration)."""
    _server_terms.clear()
    _server_terms.update(server_terms or {})


def server_terms() -> dict[str, Any]:
    """The server settings' `[sla]` terms layer (a copy)."""
    return dict(_server_terms)


async def terms_for(session: AsyncSession, site: Site) -> SlaTerms:
    """Defaults, server overrides, the organisation's contract, the site's `policy["sla"]`."""
    contract = (await session.exec(
        select(SlaContract).where(SlaContract.org_id == site.org_id)
    )).first()
    site_layer = (site.policy or {}).get("sla") if isinstance(site.policy, dict) else None
    return resolve_terms(_server_terms, contract.terms if contract else None, site_layer)


async def check_terms(session: AsyncSession, site: Site, class_key: str) -> None:
    """Raise SlaConfigError now if the site's terms for `class_key` cannot start clocks."""
    terms = await terms_for(session, site)
    calendar_from_spec(terms.calendar_spec(terms.for_class(class_key).calendar,
                                           site.timezone or "UTC"))


async def start_clocks(session: AsyncSession, ticket_id: int, site: Site, class_key: str,
                       *, now: datetime, kinds: tuple[str, ...] | None = None) -> list[SlaClock]:
    """Start the clocks of class `class_key` (all, or only `kinds`) from `now`."""
    terms = await terms_for(session, site)
    cls = terms.for_class(class_key)
    spec = terms.calendar_spec(cls.calendar, site.timezone or "UTC")
    calendar_from_spec(spec)  # refuse a bad calendar before anything is stored
    clocks = []
    for kind, target in cls.targets().items():
        if kinds is not None and kind not in kinds:
            continue
        clock = SlaClock(ticket_id=ticket_id, kind=kind, target_s=target,
                         warn_fraction=terms.warn_at, escalate_fraction=terms.escalate_at,
                         calendar=spec, started_at=now, running_since=now)
        session.add(clock)
        clocks.append(clock)
    await session.flush()
    for clock in clocks:
        await _reschedule(session, clock)
    return clocks


async def clocks_of(session: AsyncSession, ticket_id: int, *, lock: bool = False
                    ) -> list[SlaClock]:
    """The ticket's clocks (locked for update when `lock`)."""
    query = select(SlaClock).where(SlaClock.ticket_id == ticket_id).order_by(col(SlaClock.id))
    if lock:
        query = query.with_for_update()
    return list((await session.exec(query.execution_options(populate_existing=True))).all())


def used_s(clock: SlaClock, now: datetime) -> float:
    """Service time used so far."""
    if clock.running_since is None:
        return clock.consumed_s
    cal = calendar_from_spec(clock.calendar)
    return clock.consumed_s + cal.between(clock.running_since, now)


def due_at(clock: SlaClock, fraction: float) -> datetime | None:
    """When the running clock reaches `fraction` of its target (None if not running)."""
    if clock.running_since is None or clock.stopped_at is not None:
        return None
    cal = calendar_from_spec(clock.calendar)
    return cal.add(clock.running_since, fraction * clock.target_s - clock.consumed_s)


async def pause(session: AsyncSession, ticket_id: int, reason: str, *, now: datetime) -> int:
    """Add `reason` to every open clock's pauses; returns how many clocks stopped running."""
    stopped = 0
    for clock in await clocks_of(session, ticket_id, lock=True):
        if clock.stopped_at is not None or reason in clock.paused_for:
            continue
        if clock.running_since is not None:
            clock.consumed_s = used_s(clock, now)
            clock.running_since = None
            stopped += 1
        clock.paused_for = [*clock.paused_for, reason]
        await _reschedule(session, clock)
    return stopped


async def resume(session: AsyncSession, ticket_id: int, reason: str, *, now: datetime) -> int:
    """Drop `reason`; a clock with no pause left runs again. Returns how many resumed."""
    resumed = 0
    for clock in await clocks_of(session, ticket_id, lock=True):
        if clock.stopped_at is not None or reason not in clock.paused_for:
            continue
        clock.paused_for = [r for r in clock.paused_for if r != reason]
        if not clock.paused_for:
            clock.running_since = now
            resumed += 1
        await _reschedule(session, clock)
    return resumed


async def stop(session: AsyncSession, ticket_id: int, kinds: tuple[str, ...], outcome: str,
               *, now: datetime) -> list[SlaClock]:
    """Stop the named open clocks: `met` (in time or late), `exempt` or `superseded`."""
    done = []
    for clock in await clocks_of(session, ticket_id, lock=True):
        if clock.stopped_at is not None or clock.kind not in kinds:
            continue
        clock.consumed_s = used_s(clock, now)
        clock.running_since = None
        clock.stopped_at = now
        clock.outcome = ("late" if clock.breached_at is not None else "met") \
            if outcome == "met" else outcome
        await _reschedule(session, clock)
        done.append(clock)
    return done


async def _reschedule(session: AsyncSession, clock: SlaClock) -> None:
    """Rewrite the clock's unfired timers (due times, or none while paused/stopped)."""
    if clock.id is None:
        await session.flush()
    clock_id = clock.id
    if clock_id is None:
        raise RuntimeError("clock was not stored")
    clock.due_at = due_at(clock, 1.0)
    wanted = {"warning": clock.warn_fraction, "breach": 1.0,
              "escalation": clock.escalate_fraction}
    existing = {t.kind: t for t in (await session.exec(
        select(SlaTimer).where(SlaTimer.clock_id == clock_id)
    )).all()}
    for kind, fraction in wanted.items():
        when = due_at(clock, fraction) if fraction is not None else None
        timer = existing.get(kind)
        if timer is None:
            if when is not None:
                session.add(SlaTimer(clock_id=clock_id, ticket_id=clock.ticket_id, kind=kind,
                                     due_at=when))
            continue
        if timer.fired_at is None:
            await session.exec(
                sa.update(SlaTimer).where(col(SlaTimer.id) == timer.id,
                                          col(SlaTimer.fired_at).is_(None))
                .values(due_at=when)
            )
    await session.flush()

