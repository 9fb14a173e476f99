"""The fault engine: rules over each unit's telemetry and events become `Fault` rows.

The ingest worker calls `on_telemetry` / `on_event` after storing each batch, in the same
session, so a fault commits or rolls back with the data that caused it; the scheduler calls
`tick` every few seconds for what only wall time reveals (a unit gone silent, a hold time that
ran out on a unit that stopped reporting). The rules are `protocols.fault_rules` for the unit's
series with the engine's and then the site's `policy["fault_rules"]` on top; the evaluation
itself is the pure `server.faults.rules`. Others subscribe to `on_fault_opened`,
`on_fault_escalated` and `on_fault_cleared` (async callbacks, called in the same session).

Silence is judged against evidence that the site is still heard, not the wall clock alone: when
ingest lags (a broker outage, a restart, an overload) or an agent replays its backlog, every
unit looks silent at once, and opening a class A fault (and a ticket) for each would add work
exactly when the server is behind. So while a site's agent is online, a unit is silent only for
as long as its site's other data keeps arriving without it: the newest sample time of the site
ahead of the unit's own newest sample (both the gateway's clock, so its offset cancels, and a
backlog replayed in order moves both together; events travel apart from telemetry, so they do
not count; a unit the agent cannot reach also comes as the agent's own comm_lost events). Once
the agent is offline (its will), or no agent of the site ever reported, the server's clock
since the unit was last heard decides, as the `comm_loss` rule's `silence_s` says (agent or
gateway offline).

What lives where. The database holds what matters: the open fault of a (unit, code) with its
class, opened, last seen and clearing-since times (one open per unit and code: a unique partial
index, inserted with ON CONFLICT DO NOTHING, so two processes cannot both open it), and
cleared faults with `cleared_at`. In memory, per (unit, rule), only what windows need: how long
a threshold has held, flapping occurrences, a rate's samples, the poll interval. On a restart
(or after a rolled-back transaction) that is rebuilt as data comes: a held-for timer starts
again, a flapping window must watch a whole window before it may clear an open fault, a rate
needs half a window. Data older than what a unit's fault rows record is ignored, so a replay
never opens, moves or clears anything twice.

Scale-out: the windows of a unit live in the process that sees its batches; run ingest with a
shared-subscription strategy that keeps a site on one process (EMQX `hash_topic` or `sticky`).
With round-robin the index still keeps one open fault per unit and code, but a held-for or
flapping window only sees a share of the samples.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, SessionTransaction
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from protocols.fault_rules import (
    POLICY_KEY,
    CommLossCondition,
    FaultRuleError,
    RuleBook,
    load_rulebook,
    policy_key,
    shipped_rule_sets,
)
from protocols.messages import Event, TelemetryPoint
from protocols.profiles import all_profiles, shipped_profiles
from server.faults.rules import (
    Cleared,
    ClearingCancelled,
    ClearingStarted,
    Escalated,
    FaultState,
    Opened,
    RuleMachine,
    Seen,
    Tick,
    Transition,
    build_cycles,
    iso,
)
from server.models import Agent, Fault, Site, Unit

log = logging.getLogger(__name__)

FaultCallback = Callable[[AsyncSession, Fault], Awaitable[None]]
"""Called with the session and the fault after it opened, escalated or cleared."""

LIVE_S = 60.0
"""A unit that sent telemetry this recently is cleared by its samples, not by `tick`."""
TOUCH_S = 15.0
"""`last_seen_at` of an open fault is written at most this often."""
SILENCE_FLOOR_S = 10.0
"""`tick` looks in the database only for units silent at least this long."""
OPEN = "open"
CLEARED = "cleared"
_NO_POLICY = policy_key(None)


@dataclass
class _Slot:
    """One rule of one unit: its machine and the fault row it drives."""

    machine: RuleMachine
    fault_id: int | None = None
    stored_seen: datetime | None = None


@dataclass
class _UnitState:
    unit_id: int
    site_id: int
    device: str
    book_key: tuple[str | None, str]
    slots: dict[str, _Slot] = field(default_factory=dict)
    watermark: datetime | None = None
    arrived: float | None = None
    last_seen: datetime | None = None
    newest: datetime | None = None
    """The newest sample time of the unit this process stored (the gateway's clock)."""


class FaultEngine:
    """Classifies faults A-D from telemetry and events; one per server process.

    `policy` overrides the shipped rules for every site (the shape of a site's
    `policy["fault_rules"]`, see `protocols.fault_rules.RulePolicy`); a site's own overrides
    go on top. `live_s` and `touch_s`: see `LIVE_S` and `TOUCH_S`.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        policy: Mapping[str, Any] | None = None,
        live_s: float = LIVE_S,
        touch_s: float = TOUCH_S,
    ) -> None:
        self.clock = clock or SystemClock()
        self.policy = dict(policy or {})
        self._policy_key = policy_key(self.policy)  # a key per call cost json.dumps per unit
        self.live_s = live_s
        self.touch_s = touch_s
        self.on_fault_opened: list[FaultCallback] = []
        self.on_fault_escalated: list[FaultCallback] = []
        self.on_fault_cleared: list[FaultCallback] = []
        self._units: dict[int, _UnitState] = {}
        self._site_newest: dict[int, datetime] = {}
        """Site id -> the newest sample time this process stored for the site (any unit)."""
        self._books: dict[tuple[str | None, str], RuleBook] = {}
        self._listening = f"emu.faults.{id(self)}"
        self._started = self.clock.monotonic()

    # -- hooks ----------------------------------------------------------------------------
    async def on_telemetry(
        self, session: AsyncSession, site: Site, unit: Unit, points: Sequence[TelemetryPoint]
    ) -> None:
        """Evaluate a unit's new samples (by their own timestamps; older ones than seen skip)."""
        st = await self._state(session, site, unit)
        self._track(session, st)
        book = self._books[st.book_key]
        device = st.device  # not `unit.device`: an ORM attribute costs per reading
        own = [p for p in points if p.device == device]
        cycles = build_cycles(own, book.points)
        for cycle in cycles:
            if st.watermark is not None and cycle.ts < st.watermark:
                continue
            st.watermark = cycle.ts
            for slot in st.slots.values():
                transitions = slot.machine.feed(cycle)
                if transitions:  # most cycles change nothing: no coroutine for them
                    await self._apply(session, st, slot, transitions)
        st.arrived = self.clock.monotonic()
        newest = cycles[-1].ts if cycles else None  # oldest first
        if newest is not None and (st.newest is None or newest > st.newest):
            st.newest = newest
        if len(own) < len(points):
            newest = max((p.ts for p in points), default=None)
        self._heard(st.site_id, newest)

    async def on_event(
        self, session: AsyncSession, site: Site, unit: Unit | None, event: Event
    ) -> None:
        """Evaluate an event of a unit (comm_lost/restored, alarms); site events are ignored."""
        if unit is None:
            return
        st = await self._state(session, site, unit)
        self._track(session, st)
        for slot in st.slots.values():
            await self._apply(session, st, slot, slot.machine.feed(event))

    async def tick(self, session: AsyncSession, now: datetime) -> None:
        """Detect silent units and clear faults whose hold ran out on units not reporting."""
        await self._load_silent(session, now)
        await self._load_clearing(session, now)
        online = await self._online_sites(session)
        for st in list(self._units.values()):
            quiet = self._quiet_s(st, now, st.site_id in online)
            live = quiet is not None and quiet < self.live_s
            for slot in st.slots.values():
                m = slot.machine
                if m.timed or (m.clearing and not live):
                    transitions = m.feed(Tick(now, quiet))
                    if transitions:
                        self._track(session, st)
                        await self._apply(session, st, slot, transitions)

    def _heard(self, site_id: int, ts: datetime | None) -> None:
        """Move the site's newest sample time on."""
        newest = self._site_newest.get(site_id)
        if ts is not None and (newest is None or ts > newest):
            self._site_newest[site_id] = ts

    def _quiet_s(self, st: _UnitState, now: datetime, site_online: bool) -> float | None:
        """Seconds a unit has been silent, by the server's clock (see the module's docstring).

        Offline (or unknown) agent: since the unit was last heard; for a unit not heard since
        this engine started, the time since its last sample (gateway clock), but no more than
        the engine has been running. Online agent: only how far the site's newest data is ahead
        of the unit's (0 while nothing newer of the site has arrived: late, not missing).
        """
        mono = self.clock.monotonic()
        if st.arrived is not None:
            quiet = mono - st.arrived
        elif st.last_seen is None:
            return None
        else:
            quiet = min(mono - self._started, (now - st.last_seen).total_seconds())
        if not site_online:
            return quiet
        site_newest = self._site_newest.get(st.site_id)
        unit_newest = st.newest or st.last_seen
        if site_newest is None or unit_newest is None:
            return 0.0
        return max(0.0, min(quiet, (site_newest - unit_newest).total_seconds()))

    async def _online_sites(self, session: AsyncSession) -> set[int]:
        """Sites with an agent whose last status was `online` (one small query per tick)."""
        rows = await session.exec(
            select(Agent.site_id).where(col(Agent.online).is_(True)).distinct())
        return set(rows.all())

    # -- rules per unit -------------------------------------------------------------------
    def book(self, site: Site, unit: Unit) -> RuleBook:
        """The rules in force for a unit (shipped, then engine policy, then site policy)."""
        return self._books[self._book_key(site, unit)]

    def _book_key(self, site: Site, unit: Unit) -> tuple[str | None, str]:
        series = _series_of(unit)
        site_policy = (site.policy or {}).get(POLICY_KEY)
        site_key = policy_key(site_policy) if site_policy else _NO_POLICY
        key = (series, f"{self._policy_key}|{site_key}")
        if key not in self._books:
            book = load_rulebook(series)
            try:
                book = book.with_policy(self.policy, "server fault policy")
            except FaultRuleError as exc:
                log.error("%s; using the shipped fault rules", exc)
            try:
                book = book.with_policy(site_policy, f"site {site.code}: policy.{POLICY_KEY}")
            except FaultRuleError as exc:
                log.error("%s; the site's overrides are ignored", exc)
            self._books[key] = book
        return key

    async def _state(self, session: AsyncSession, site: Site, unit: Unit) -> _UnitState:
        if unit.id is None or site.id is None:
            raise ValueError("the fault engine needs stored sites and units (with ids)")
        key = self._book_key(site, unit)
        st = self._units.get(unit.id)
        if st is None or st.book_key != key:
            st = _UnitState(unit.id, site.id, unit.device, key, last_seen=unit.last_seen)
            await self._load(session, st, unit)
            self._units[unit.id] = st
        return st

    async def _load(self, session: AsyncSession, st: _UnitState, unit: Unit) -> None:
        """Machines for a unit, picking up its open faults and what was cleared last."""
        book = self._books[st.book_key]
        rows = await session.exec(
            select(Fault).where(Fault.unit_id == st.unit_id, Fault.state == OPEN)
        )
        open_faults = {f.code: f for f in rows.all()}
        cleared = await session.exec(
            select(Fault.code, func.max(Fault.cleared_at))
            .where(Fault.unit_id == st.unit_id, Fault.state == CLEARED)
            .group_by(Fault.code)
        )
        horizons: dict[str, datetime] = {code: ts for code, ts in cleared.all() if ts is not None}
        for rule in book.enabled:
            f = open_faults.pop(rule.code, None)
            horizon = horizons.get(rule.code)
            state = None
            if f is not None:
                state = FaultState(f.fault_class, f.opened_at, f.last_seen_at, f.clearing_since)
                horizon = max(t for t in (horizon, f.last_seen_at, f.clearing_since) if t)
            machine = RuleMachine(rule, book.catalog, state, horizon, unit.last_seen)
            st.slots[rule.code] = _Slot(machine, f.id if f else None,
                                        f.last_seen_at if f else None)
        for orphan in open_faults.values():  # its rule was disabled or removed
            await self._close_orphan(session, orphan)

    # -- database -------------------------------------------------------------------------
    async def _apply(self, session: AsyncSession, st: _UnitState, slot: _Slot,
                     transitions: Iterable[Transition]) -> None:
        for t in transitions:
            if isinstance(t, Opened):
                await self._open(session, st, slot, t)
                continue
            if isinstance(t, Seen) and not self._due(slot, t.ts):
                continue
            fault = await self._open_row(session, slot)
            if fault is None:
                slot.machine.reset(getattr(t, "ts", None))
                slot.fault_id = slot.stored_seen = None
                return
            if isinstance(t, Seen):
                fault.last_seen_at = max(fault.last_seen_at, t.ts)
                slot.stored_seen = fault.last_seen_at
            elif isinstance(t, ClearingStarted):
                fault.clearing_since = t.ts
            elif isinstance(t, ClearingCancelled):
                fault.clearing_since = None
                fault.last_seen_at = max(fault.last_seen_at, t.ts)
                slot.stored_seen = fault.last_seen_at
            elif isinstance(t, Escalated):
                fault.escalated_from = t.from_class
                fault.fault_class = t.to_class
                fault.title = t.title[:200]
                history = list(fault.evidence.get("escalations", []))
                fault.evidence = {**fault.evidence, "escalations": [*history, t.evidence]}
                await session.flush()
                await self._notify(self.on_fault_escalated, session, fault)
                continue
            elif isinstance(t, Cleared):
                fault.state = CLEARED
                fault.cleared_at = t.ts
                fault.evidence = {**fault.evidence, "cleared": t.evidence}
                slot.fault_id = slot.stored_seen = None
                await session.flush()
                await self._notify(self.on_fault_cleared, session, fault)
                continue
            await session.flush()

    def _due(self, slot: _Slot, ts: datetime) -> bool:
        """Whether `last_seen_at` is old enough to be written again."""
        seen = slot.stored_seen
        return seen is None or ts - seen >= timedelta(seconds=self.touch_s)

    async def _open(self, session: AsyncSession, st: _UnitState, slot: _Slot, t: Opened) -> None:
        """Insert the fault; if another process opened one first, follow that one."""
        values = {
            "site_id": st.site_id, "unit_id": st.unit_id, "code": slot.machine.rule.code,
            "fault_class": t.fault_class, "title": t.title[:200], "state": OPEN,
            "opened_at": t.ts, "last_seen_at": t.ts, "escalated_from": t.escalated_from,
            "evidence": t.evidence,
        }
        fault_id = await _insert_open(session, values)
        if fault_id is None:
            existing = (await session.exec(
                select(Fault).where(Fault.unit_id == st.unit_id, Fault.state == OPEN,
                                    Fault.code == slot.machine.rule.code)
            )).first()
            if existing is None or existing.id is None:  # it cleared in between: try next time
                slot.machine.reset(None)
                return
            log.info("fault %s of unit %s was opened by another process; following it",
                     existing.code, st.unit_id)
            slot.machine.adopt(FaultState(existing.fault_class, existing.opened_at,
                                          existing.last_seen_at, existing.clearing_since))
            slot.fault_id, slot.stored_seen = existing.id, existing.last_seen_at
            return
        slot.fault_id, slot.stored_seen = fault_id, t.ts
        fault = await session.get(Fault, fault_id)
        if fault is not None:
            await self._notify(self.on_fault_opened, session, fault)

    async def _open_row(self, session: AsyncSession, slot: _Slot) -> Fault | None:
        """The slot's fault row, locked, if it is still open (someone may have cleared it)."""
        if slot.fault_id is None:
            return None
        rows = await session.exec(
            select(Fault).where(Fault.id == slot.fault_id, Fault.state == OPEN)
            .with_for_update().execution_options(populate_existing=True)
        )
        return rows.first()

    async def _close_orphan(self, session: AsyncSession, fault: Fault) -> None:
        now = self.clock.now()
        fault.state = CLEARED
        fault.cleared_at = max(now, fault.last_seen_at)
        fault.evidence = {**fault.evidence, "cleared": {
            "cleared_at": iso(fault.cleared_at), "reason": "rule disabled or removed"}}
        await session.flush()
        await self._notify(self.on_fault_cleared, session, fault)

    async def _notify(self, callbacks: Sequence[FaultCallback], session: AsyncSession,
                      fault: Fault) -> None:
        for cb in callbacks:
            await cb(session, fault)

    # -- units the scheduler must look at ---------------------------------------------------
    async def _load_silent(self, session: AsyncSession, now: datetime) -> None:
        """Units silent since before this process knew them (after a restart) into memory."""
        codes = _comm_codes()
        open_comm = (
            select(Fault.id)
            .where(Fault.unit_id == Unit.id, Fault.state == OPEN, col(Fault.code).in_(codes))
            .exists()
        )
        rows = await session.exec(
            select(Unit, Site).join(Site, col(Site.id) == Unit.site_id).where(
                col(Unit.last_seen).is_not(None),
                col(Unit.last_seen) < now - timedelta(seconds=SILENCE_FLOOR_S),
                ~open_comm,
            )
        )
        for unit, site in rows.all():
            if unit.id not in self._units:
                await self._state(session, site, unit)

    async def _load_clearing(self, session: AsyncSession, now: datetime) -> None:
        """Units with a fault whose hold time runs, not in memory (after a restart)."""
        rows = await session.exec(
            select(Fault.unit_id).where(
                Fault.state == OPEN, col(Fault.clearing_since).is_not(None),
                col(Fault.clearing_since) <= now,
            ).distinct()
        )
        missing = [uid for uid in rows.all() if uid not in self._units]
        if not missing:
            return
        pairs = await session.exec(
            select(Unit, Site).join(Site, col(Site.id) == Unit.site_id)
            .where(col(Unit.id).in_(missing))
        )
        for unit, site in pairs.all():
            await self._state(session, site, unit)

    # -- rollback ---------------------------------------------------------------------------
    def _track(self, session: AsyncSession, st: _UnitState) -> None:
        """Remember which (savepoint) transaction evaluated a unit.

        If that transaction, or one around it, rolls back, the unit's state is dropped and
        reloaded from the database on next use (the caller may then feed the same data again).
        """
        sync = session.sync_session
        touched: dict[int, set[SessionTransaction | None]] | None = sync.info.get(
            self._listening)
        if touched is None:
            touched = sync.info[self._listening] = {}
            units = self._units

            def forget(_session: Session, previous: SessionTransaction) -> None:
                for uid, txns in list(touched.items()):
                    if any(_within(t, previous) for t in txns):
                        units.pop(uid, None)
                        del touched[uid]

            def committed(_session: Session) -> None:
                touched.clear()

            sa_event.listen(sync, "after_soft_rollback", forget)
            sa_event.listen(sync, "after_commit", committed)
        # None: no transaction has begun yet; the outermost one will be it
        txn = sync.get_nested_transaction() or sync.get_transaction()
        touched.setdefault(st.unit_id, set()).add(txn)


def _within(txn: SessionTransaction | None, outer: SessionTransaction) -> bool:
    """Whether `txn` is `outer` or nested inside it (None: the outermost, when it begins)."""
    if txn is None:
        return outer.parent is None
    while txn is not None:
        if txn is outer:
            return True
        txn = txn.parent
    return False


async def _insert_open(session: AsyncSession, values: Mapping[str, Any]) -> int | None:
    """INSERT ... ON CONFLICT (one open fault per unit and code) DO NOTHING; the new id or None."""
    conn = await session.connection()
    dialect = conn.dialect.name
    table = Fault.__table__  # type: ignore[attr-defined]
    where = sa.text("state = 'open'")
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing(
            index_elements=["unit_id", "code"], index_where=where)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(
            index_elements=["unit_id", "code"], index_where=where)
    else:  # pragma: no cover - the two supported databases are above
        stmt = sa.insert(table).values(**values)
    result = await conn.execute(stmt.returning(table.c.id))
    row = result.first()
    return None if row is None else int(row[0])


@functools.cache
def _known_series() -> tuple[frozenset[str], Mapping[str, str]]:
    by_model = {p.model: p.series for p in all_profiles()}
    return frozenset({*shipped_rule_sets(), *shipped_profiles()}), by_model


def _series_of(unit: Unit) -> str | None:
    """The unit's series if its rules or profile ship, else from its model, else unknown."""
    known, by_model = _known_series()
    if unit.series and unit.series.upper() in known:
        return unit.series.upper()
    return by_model.get(unit.model or "")


@functools.cache
def _comm_codes() -> list[str]:
    """Codes of the shipped communication-loss rules."""
    codes = {
        r.code
        for series in (*shipped_rule_sets(), None)
        for r in load_rulebook(series).rules
        if isinstance(r, CommLossCondition)
    }
    return sorted(codes)
