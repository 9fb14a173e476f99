"""Writing notifications for a ticket's escalation chain into the outbox (`SlaNotification`).

Only rows are written here, in the caller's transaction; the SLA engine's sender delivers
them (see server/sla/engine.py), so a notice exists exactly when the change that caused it
committed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.models import Site, User
from server.sla import clocks
from server.sla.models import SlaNotification
from server.sla.policy import Contact, SlaTerms
from server.tickets.models import Ticket


async def notify_chain(session: AsyncSession, ticket: Ticket, *, level: str, event: str,
                       text: str, now: datetime, timer_id: int | None = None,
                       extra: dict[str, Any] | None = None,
                       cache: dict[int, tuple[Site, SlaTerms]] | None = None) -> int:
    """Queue one email and/or webhook per contact of `level`; returns how many rows.

    `cache` (site id -> site and terms) saves the look-ups when one transaction notifies
    about many tickets of a site (the SLA engine's batches)."""
    if ticket.id is None:
        return 0
    if cache is not None and ticket.site_id in cache:
        site, terms = cache[ticket.site_id]
    else:
        found = await session.get(Site, ticket.site_id)
        if found is None:
            return 0
        site, terms = found, await clocks.terms_for(session, found)
        if cache is not None:
            cache[ticket.site_id] = (site, terms)
    contacts = [c for c in terms.chain if c.level == level]
    if level == "engineer" and ticket.assignee:
        user = (await session.exec(select(User).where(User.name == ticket.assignee))).first()
        if user is not None and user.email:
            contacts.append(Contact(level="engineer", name=user.name, email=user.email))
    payload: dict[str, Any] = {
        "event": event, "ticket": ticket.id, "site": site.code, "class": ticket.fault_class,
        "level": level, "title": ticket.title, "text": text, **(extra or {}),
    }
    subject = f"[EMU SLA] {event.replace('_', ' ')}: ticket {ticket.id} {ticket.title}"[:300]
    seen: set[tuple[str, str]] = set()
    for contact in contacts:
        for channel, to in (("email", contact.email), ("webhook", contact.webhook)):
            if to and (channel, to) not in seen:
                seen.add((channel, to))
                session.add(SlaNotification(
                    ticket_id=ticket.id, timer_id=timer_id, channel=channel, recipient=to,
                    level=level, subject=subject, payload={**payload, "to": contact.name or to},
                    created_at=now, next_try_at=now))
    return len(seen)
