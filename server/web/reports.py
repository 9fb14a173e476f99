"""The monthly SLA report page: compliance per class and customer, MTTA, MTTR, breaches.

Figures come from `server/sla/report.py` (the same report as `GET /api/v1/sla/report` and
`emu sla report`); a customer gets its own organisation's only. Charts are inline SVG, with
the same figures in the table beside them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from server.sla.report import ALL, sla_report
from server.web.auth import WebUser, is_staff
from server.web.charts import bar_chart
from server.web.render import render

router = APIRouter()
COMPLIANCE_TARGET = 95.0


@router.get("/sla", response_class=HTMLResponse, include_in_schema=False)
async def sla_page(
    request: Request, user: WebUser,
    month: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}$")] = None,
) -> HTMLResponse:
    """One month's SLA report (default: the current month, UTC)."""
    now = request.app.state.clock()
    month = month or now.strftime("%Y-%m")
    org_id = None if is_staff(user) else (user.org_id or -1)
    async with request.app.state.db.session() as session:
        report = await sla_report(session, month, org_id=org_id)
    totals = [r for r in report.rows if r.customer == ALL] or report.rows
    compliance = bar_chart([(r.fault_class, r.compliance_pct) for r in totals],
                           f"SLA compliance per class, {month} (%)", target=COMPLIANCE_TARGET)
    mtta = [(r.fault_class, r.mtta_s / 60 if r.mtta_s is not None else None) for r in totals]
    mttr = [(r.fault_class, r.mttr_s / 60 if r.mttr_s is not None else None) for r in totals]
    top = max([v for _, v in mtta + mttr if v is not None] + [1.0])
    return render(request, "sla.html", {
        "user": user, "month": month, "report": report, "compliance": compliance,
        "mtta": bar_chart(mtta, f"MTTA per class, {month} (minutes)", max_value=top),
        "mttr": bar_chart(mttr, f"MTTR per class, {month} (minutes)", max_value=top),
        "target": COMPLIANCE_TARGET,
    })
