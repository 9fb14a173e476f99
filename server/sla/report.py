"""The monthly SLA report: compliance per class and customer, MTTA, MTTR, breaches and causes.

Which tickets: those opened in the month (UTC). Per (customer, class) row:

* `tickets`: how many were opened;
* `clocks_met` / `clocks_breached`: SLA clocks decided so far (a clock met in time, or one that
  ran out, whether or not the work was finished later); running clocks that have not run out
  and clocks exempted (C/D awaiting release) or superseded (class changed) are not counted;
* `compliance_pct`: met / (met + breached) x 100, None when nothing is decided;
* `mtta_s`: mean wall time from opening to the first response (acknowledged);
* `mttr_s`: mean wall time from opening to resolved, over resolved tickets.

Rows with customer `*` total each class over all customers. `breaches` lists each breached
clock with its cause: the engineer's note (`breach_cause` on the timeline) if there is one,
else what the ticket lacked when the clock ran out.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from statistics import fmean
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.models import Organisation, Site
from server.sla.errors import SlaConfigError
from server.sla.models import SlaClock
from server.tickets.models import Ticket, TicketEvent

ALL = "*"


@dataclass
class ReportRow:
    """Figures of one customer and class in the month."""

    customer: str
    fault_class: str
    tickets: int = 0
    clocks_met: int = 0
    clocks_breached: int = 0
    compliance_pct: float | None = None
    mtta_s: float | None = None
    mttr_s: float | None = None


@dataclass
class Breach:
    """One clock that ran out."""

    ticket_id: int
    customer: str
    site: str
    fault_class: str
    clock: str
    due_at: str
    cause: str


@dataclass
class SlaReport:
    """The whole report."""

    month: str
    rows: list[ReportRow] = field(default_factory=list)
    breaches: list[Breach] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlaReport:
        """Back from `as_dict` (the CLI renders the API's JSON as CSV with `report_csv`)."""
        return cls(month=data["month"], rows=[ReportRow(**r) for r in data["rows"]],
                   breaches=[Breach(**b) for b in data["breaches"]])


def month_range(month: str) -> tuple[datetime, datetime]:
    """`2026-11` -> [2026-11-01, 2026-12-01) in UTC."""
    try:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise SlaConfigError(f"month must look like 2026-11, not {month!r}") from None
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 \
        else start.replace(month=start.month + 1)
    return start, end


def class_label(ticket: Ticket) -> str:
    """A ticket's class for the report (`upgrade` for upgrade requests, `-` unclassified)."""
    if ticket.source == "upgrade_request":
        return "upgrade"
    return ticket.fault_class or "-"


@dataclass
class _Acc:
    tickets: int = 0
    met: int = 0
    breached: int = 0
    ack: list[float] = field(default_factory=list)
    res: list[float] = field(default_factory=list)

    def row(self, customer: str, cls: str) -> ReportRow:
        decided = self.met + self.breached
        return ReportRow(
            customer=customer, fault_class=cls, tickets=self.tickets, clocks_met=self.met,
            clocks_breached=self.breached,
            compliance_pct=round(100.0 * self.met / decided, 2) if decided else None,
            mtta_s=round(fmean(self.ack), 1) if self.ack else None,
            mttr_s=round(fmean(self.res), 1) if self.res else None)


async def sla_report(session: AsyncSession, month: str, *, org_id: int | None = None
                     ) -> SlaReport:
    """The report of `month` (`YYYY-MM`), for one organisation or all."""
    start, end = month_range(month)
    query = (select(Ticket, Organisation.name, Site.code)
             .join(Organisation, col(Organisation.id) == col(Ticket.org_id))
             .join(Site, col(Site.id) == col(Ticket.site_id))
             .where(col(Ticket.created_at) >= start, col(Ticket.created_at) < end)
             .order_by(col(Ticket.id)))
    if org_id is not None:
        query = query.where(Ticket.org_id == org_id)
    found = (await session.exec(query)).all()
    ids = [t.id for t, _, _ in found]
    clocks: dict[int, list[SlaClock]] = defaultdict(list)
    causes: dict[tuple[int, str], str] = {}
    if ids:
        for c in (await session.exec(select(SlaClock).where(col(SlaClock.ticket_id).in_(ids))
                                     .order_by(col(SlaClock.id)))).all():
            clocks[c.ticket_id].append(c)
        events = (await session.exec(select(TicketEvent).where(
            col(TicketEvent.ticket_id).in_(ids),
            col(TicketEvent.kind).in_(("sla_breach", "breach_cause")))
            .order_by(col(TicketEvent.id)))).all()
        for e in events:  # a later engineer's note replaces the automatic cause
            key = (e.ticket_id, str(e.detail.get("clock")))
            causes[key] = e.text if e.kind == "breach_cause" else str(e.detail.get("cause"))
    acc: dict[tuple[str, str], _Acc] = defaultdict(_Acc)
    report = SlaReport(month=month)
    for ticket, customer, site in found:
        cls = class_label(ticket)
        targets = (acc[(customer, cls)], acc[(ALL, cls)])
        for a in targets:
            a.tickets += 1
            if ticket.acknowledged_at is not None:
                a.ack.append((ticket.acknowledged_at - ticket.created_at).total_seconds())
            if ticket.resolved_at is not None:
                a.res.append((ticket.resolved_at - ticket.created_at).total_seconds())
        for c in clocks[service_id(ticket)]:
            if c.outcome == "superseded" or (c.outcome == "exempt" and c.breached_at is None):
                continue
            if c.breached_at is not None:
                for a in targets:
                    a.breached += 1
                report.breaches.append(Breach(
                    ticket_id=service_id(ticket), customer=customer, site=site,
                    fault_class=cls, clock=c.kind, due_at=c.breached_at.isoformat(),
                    cause=causes.get((service_id(ticket), c.kind), "")))
            elif c.outcome == "met":
                for a in targets:
                    a.met += 1
    report.rows = [a.row(customer, cls) for (customer, cls), a in
                   sorted(acc.items(), key=lambda kv: (kv[0][0] == ALL, kv[0][0], kv[0][1]))]
    return report


def service_id(ticket: Ticket) -> int:
    """The ticket's id (it came from the database)."""
    if ticket.id is None:
        raise RuntimeError("ticket without id")
    return ticket.id


def report_csv(report: SlaReport) -> str:
    """Two CSV sections: the compliance rows, a blank line, then the breaches."""
    out = io.StringIO()
    rows = csv.writer(out, lineterminator="\n")
    rows.writerow(["month", *ReportRow.__dataclass_fields__])
    for r in report.rows:
        rows.writerow([report.month, *("" if v is None else v for v in asdict(r).values())])
    out.write("\n")
    rows.writerow(["month", *Breach.__dataclass_fields__])
    for b in report.breaches:
        rows.writerow([report.month, *asdict(b).values()])
    return out.getvalue()
