"""The log-in, fleet, site and fault pages."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import select

from server.errors import NotFound
from server.models import Site
from server.web import queries, tickets
from server.web.auth import (
    Csrf,
    WebUser,
    check_login,
    end_session,
    start_session,
)
from server.web.charts import line_chart, site_map
from server.web.render import render

router = APIRouter()

CHART_SPANS = {"6h": (timedelta(hours=6), 60), "48h": (timedelta(hours=48), 3600),
               "7d": (timedelta(days=7), 3600)}
DEFAULT_CHART_POINT = "W"


def safe_next(value: str | None) -> str:
    """Where to go after log-in: a path on this site only (no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
async def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    """The log-in form."""
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse, include_in_schema=False,
             dependencies=[Csrf])
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=100)],
    password: Annotated[str, Form(max_length=200)],
    next: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    """Check the password; on success a fresh session and a redirect to `next`."""
    async with request.app.state.db.session() as session:
        user = await check_login(session, username.strip(), password)
    if user is None:
        return render(request, "login.html", {"next": safe_next(next), "username": username,
                                              "error": "Unknown user name or wrong password."},
                      status=401)
    start_session(request, user, request.app.state.clock())
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/logout", include_in_schema=False, dependencies=[Csrf])
async def logout(request: Request) -> RedirectResponse:
    """End the session."""
    end_session(request)
    return RedirectResponse("/login", status_code=303)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def fleet(request: Request, user: WebUser) -> HTMLResponse:
    """Sites with online state, open faults by class, SLA clocks at risk, the map."""
    async with request.app.state.db.session() as session:
        sites = await queries.fleet(session, user)
        counts = await queries.fault_counts(session, user)
        at_risk = await tickets.clocks_at_risk(session, user, request.app.state.clock())
    pins = [(s.site.code, s.site.name, s.site.latitude, s.site.longitude, s.state)
            for s in sites if s.site.latitude is not None and s.site.longitude is not None]
    return render(request, "fleet.html", {
        "user": user, "sites": sites, "counts": counts, "at_risk": at_risk,
        "map": site_map(pins),
    })


@router.get("/sites/{code}", response_class=HTMLResponse, include_in_schema=False)
async def site_page(
    request: Request, user: WebUser, code: str,
    point: Annotated[str, Query(max_length=96)] = DEFAULT_CHART_POINT,
    span: Annotated[str, Query(pattern="^(6h|48h|7d)$")] = "6h",
) -> HTMLResponse:
    """Units with live values and status, charts from rollups, firmware versions."""
    now = request.app.state.clock()
    delta, width = CHART_SPANS[span]
    async with request.app.state.db.session() as session:
        site = await queries.visible_site(session, user, code)
        site_id = site.id or 0
        units = await queries.site_units(session, site_id)
        points = await queries.site_points(session, site_id)
        full = next((p for p in points if p == point or p.endswith("." + point)), None)
        charts = []
        if full is not None:
            for view in units:
                samples = await queries.chart_samples(session, view.unit.id or 0, full,
                                                      now - delta, now, width)
                charts.append((view.unit.device, line_chart(samples, f"{view.unit.device} "
                                                            f"{full}, last {span}")))
    return render(request, "site.html", {
        "user": user, "site": site, "units": units, "points": points, "point": full or point,
        "span": span, "spans": list(CHART_SPANS), "charts": charts,
    })


@router.get("/faults", response_class=HTMLResponse, include_in_schema=False)
async def faults_page(
    request: Request, user: WebUser,
    fault_class: Annotated[list[str] | None, Query(alias="class")] = None,
    state: Annotated[str, Query(pattern="^(open|cleared|all)$")] = "open",
    site: Annotated[str | None, Query(max_length=64)] = None,
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> HTMLResponse:
    """Faults of the visible sites (A-D), filtered by class, state and site."""
    classes = tuple(c for c in (fault_class or []) if c in ("A", "B", "C", "D"))
    limit = queries.MAX_FAULTS_PAGE
    async with request.app.state.db.session() as session:
        site_row = await queries.visible_site(session, user, site) if site else None
        rows, total = await queries.faults(
            session, user, state=None if state == "all" else state, classes=classes,
            site_id=site_row.id if site_row else None, limit=limit, offset=(page - 1) * limit,
        )
        sites = (await session.exec(select(Site.code, Site.name).where(
            Site.id.in_([s.site.id for s in await queries.fleet(session, user)])  # type: ignore[union-attr]
        ).order_by(Site.name))).all()
        clocks = await tickets.fault_clocks(session, [r.fault.id or 0 for r in rows],
                                            request.app.state.clock())
    query = "&".join([f"class={c}" for c in classes] + [f"state={state}"] +
                     ([f"site={quote(site)}"] if site else []))
    return render(request, "faults.html", {
        "user": user, "rows": rows, "total": total, "classes": classes, "state": state,
        "site": site, "sites": sites, "page": page, "pages": max(1, -(-total // limit)),
        "query": query, "clocks": clocks,
    })


@router.get("/faults/{fault_id}", response_class=HTMLResponse, include_in_schema=False)
async def fault_page(request: Request, user: WebUser, fault_id: int) -> HTMLResponse:
    """One fault: class, times, evidence."""
    async with request.app.state.db.session() as session:
        rows, _ = await queries.faults(session, user, state=None, fault_id=fault_id, limit=1)
    if not rows:
        raise NotFound(f"fault {fault_id} not found")
    return render(request, "fault.html", {"user": user, "r": rows[0]})
