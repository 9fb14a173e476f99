"""The SLA engine: fires due timers and sends the notifications they wrote, exactly once.

The scheduler role calls `tick()` every few seconds. Both halves claim rows, so any number of
server processes can run it on one database:

* `fire_due` selects due, unfired `SlaTimer` rows `FOR UPDATE SKIP LOCKED` (PostgreSQL) and
  marks each fired with a conditional `UPDATE ... WHERE fired_at IS NULL` (which is also the
  whole guard on SQLite, where writers are serialised). In the same transaction it stamps the
  clock (`warned_at` / `breached_at` = the instant the timer was due, not when it was seen:
  a server that was down at that moment still records the right time), writes the ticket's
  timeline entry and one `SlaNotification` per recipient and channel. So a warning, breach or
  escalation exists once or not at all.
* `send_due` delivers the outbox. On PostgreSQL one row is locked (`SKIP LOCKED`), sent and
  marked sent in one transaction; on SQLite a row is leased first (`lease_until`), then sent
  and marked. Either way two processes never send the same row; a crash between delivery and
  commit re-sends that one message (at-least-once at that single point, the usual outbox rule).

Who hears what (the escalation chain of the terms): the warning at `warn_at` (75 %) goes to
the engineer (the ticket's assignee, and the chain's `engineer` contacts), the breach at 100 %
to the `lead`, the escalation at `escalate_at` (150 %) to the `manager`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from server.core.db import Database
from server.models import Site
from server.sla import clocks
from server.sla.config import SlaSettings
from server.sla.errors import NotifyError
from server.sla.models import SlaClock, SlaNotification, SlaTimer
from server.sla.notify import Notifier, Sender
from server.sla.outbox import notify_chain
from server.sla.policy import SlaTerms
from server.tickets.models import Ticket, TicketEvent

log = logging.getLogger(__name__)

LEVEL_OF = {"warning": "engineer", "breach": "lead", "escalation": "manager"}
EVENT_OF = {"warning": "sla_warning", "breach": "sla_breach", "escalation": "sla_escalation"}


@dataclass
class TickResult:
    """What one tick did."""

    fired: int = 0
    sent: int = 0
    failed: int = 0


class SlaEngine:
    """Fires timers and sends notifications; one per server process (scheduler role)."""

    def __init__(self, db: Database, settings: SlaSettings | None = None,
                 clock: Clock | None = None, sender: Sender | None = None) -> None:
        self.db = db
        self.settings = settings or SlaSettings()
        self.clock = clock or SystemClock()
        self.sender: Sender = sender or Notifier(self.settings)
        self.ticks = 0

    async def close(self) -> None:
        """Close the sender's connections."""
        await self.sender.aclose()

    async def tick(self, now: datetime | None = None) -> TickResult:
        """Fire what is due, then send what is pending."""
        now = now or self.clock.now()
        result = TickResult(fired=await self.fire_due(now))
        result.sent, result.failed = await self.send_due(now)
        self.ticks += 1
        return result

    # -- timers ------------------------------------------------------------------------------
    async def fire_due(self, now: datetime) -> int:
        """Fire every timer due by `now` (in batches); returns how many fired here."""
        fired = 0
        while True:
            async with self.db.session() as session:
                n, more = await self._fire_batch(session, now)
            fired += n
            if not more:
                return fired

    async def _fire_batch(self, session: AsyncSession, now: datetime) -> tuple[int, bool]:
        query = (select(SlaTimer)
                 .where(col(SlaTimer.fired_at).is_(None), col(SlaTimer.due_at).is_not(None),
                        col(SlaTimer.due_at) <= now)
                 .order_by(col(SlaTimer.due_at), col(SlaTimer.id)).limit(self.settings.batch))
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        timers = list((await session.exec(query)).all())
        fired = 0
        cache: dict[int, tuple[Site, SlaTerms]] = {}
        for timer in timers:
            if await self._fire(session, timer, now, cache):
                fired += 1
        return fired, len(timers) == self.settings.batch and fired > 0

    async def _fire(self, session: AsyncSession, timer: SlaTimer, now: datetime,
                    cache: dict[int, tuple[Site, SlaTerms]]) -> bool:
        # Lock order as in the ticket service (ticket, then clock); a ticket being changed
        # right now is skipped and looked at again next tick.
        ticket = (await session.exec(
            select(Ticket).where(Ticket.id == timer.ticket_id).with_for_update(skip_locked=True)
        )).first()
        if ticket is None:
            return False
        clock = (await session.exec(
            select(SlaClock).where(SlaClock.id == timer.clock_id).with_for_update()
            .execution_options(populate_existing=True)
        )).one()
        fraction = {"warning": clock.warn_fraction, "breach": 1.0,
                    "escalation": clock.escalate_fraction}[timer.kind]
        due = clocks.due_at(clock, fraction) if fraction is not None else None
        if due is None or due > now:  # a stale due time: the clock paused, stopped or moved
            await session.exec(sa.update(SlaTimer).where(
                col(SlaTimer.id) == timer.id, col(SlaTimer.fired_at).is_(None)).values(due_at=due))
            return False
        claimed = await session.exec(sa.update(SlaTimer).where(
            col(SlaTimer.id) == timer.id, col(SlaTimer.fired_at).is_(None)).values(fired_at=now))
        if claimed.rowcount != 1:
            return False
        if timer.kind == "warning":
            clock.warned_at = due
        elif timer.kind == "breach":
            clock.breached_at = due
        cause = _cause(ticket, clock) if timer.kind != "warning" else None
        text = (f"{clock.kind} clock of ticket {ticket.id} (class "
                f"{ticket.fault_class or '-'}) {_verb(timer.kind)} at {due.isoformat()}")
        session.add(TicketEvent(ticket_id=clock.ticket_id, ts=due, kind=EVENT_OF[timer.kind],
                                text=text, detail={"clock": clock.kind, "due_at": due.isoformat(),
                                                   "detected_at": now.isoformat(),
                                                   "cause": cause}))
        await notify_chain(session, ticket, level=LEVEL_OF[timer.kind], event=EVENT_OF[timer.kind],
                           text=text, now=now, timer_id=timer.id,
                           extra={"clock": clock.kind, "due_at": due.isoformat()}, cache=cache)
        log.info("%s", text)
        return True

    # -- outbox ------------------------------------------------------------------------------
    async def send_due(self, now: datetime) -> tuple[int, int]:
        """Send pending notifications; returns (sent, failed) by this process."""
        sent = failed = 0
        for _ in range(self.settings.batch):
            outcome = await (self._send_one_locked(now) if not self.db.is_sqlite
                             else self._send_one_leased(now))
            if outcome is None:
                break
            sent += outcome
            failed += not outcome
        return sent, failed

    def _pending(self, now: datetime) -> Any:
        return (select(SlaNotification)
                .where(col(SlaNotification.sent_at).is_(None),
                       col(SlaNotification.next_try_at) <= now,
                       SlaNotification.attempts < self.settings.max_attempts)
                .order_by(col(SlaNotification.id)))

    async def _send_one_locked(self, now: datetime) -> bool | None:
        """PostgreSQL: lock one row (others skip it), deliver, mark, commit."""
        async with self.db.session() as session:
            row = (await session.exec(
                self._pending(now).limit(1).with_for_update(skip_locked=True))).first()
            if row is None:
                return None
            return await self._deliver(row, now)

    async def _send_one_leased(self, now: datetime) -> bool | None:
        """SQLite: lease one row with a conditional update, then deliver and mark."""
        lease = now + timedelta(seconds=self.settings.lease_s)
        async with self.db.session() as session:
            candidates = (await session.exec(self._pending(now).limit(20))).all()
            row_id = None
            for cand in candidates:
                res = await session.exec(sa.update(SlaNotification).where(
                    col(SlaNotification.id) == cand.id, col(SlaNotification.sent_at).is_(None),
                    sa.or_(col(SlaNotification.lease_until).is_(None),
                           col(SlaNotification.lease_until) < now),
                ).values(lease_until=lease))
                if res.rowcount == 1:
                    row_id = cand.id
                    break
            if row_id is None:
                return None
        async with self.db.session() as session:
            row = await session.get(SlaNotification, row_id)
            if row is None:
                return None
            return await self._deliver(row, now)

    async def _deliver(self, row: SlaNotification, now: datetime) -> bool:
        try:
            await self.sender.send(row.channel, row.recipient, row.subject, row.payload)
        except NotifyError as exc:
            row.attempts += 1
            row.last_error = str(exc)[:500]
            row.next_try_at = now + timedelta(seconds=self.settings.retry_s * row.attempts)
            row.lease_until = None
            log.warning("SLA notification %s not delivered (attempt %d): %s",
                        row.id, row.attempts, exc)
            return False
        row.attempts += 1
        row.sent_at = now
        return True


def _verb(kind: str) -> str:
    return {"warning": "reached its warning level", "breach": "was breached",
            "escalation": "escalated to the manager"}[kind]


def _cause(ticket: Ticket, clock: SlaClock) -> str:
    """What the ticket still lacked when the clock ran out (the report's default cause)."""
    if clock.kind == "response":
        return "not acknowledged"
    if clock.kind == "processing":
        return f"no diagnosis yet (state {ticket.state})"
    if clock.kind == "delivery":
        return f"upgrade not delivered (state {ticket.state})"
    return f"not resolved (state {ticket.state}, assignee {ticket.assignee or 'none'})"
