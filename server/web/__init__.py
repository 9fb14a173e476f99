"""The dashboard: server-rendered pages for engineers and customers, live over SSE.

`create_web_app` builds a separate ASGI app (its own session middleware and HTML error pages)
that `server.app.create_app` makes the fallback of its router (whatever no API route
matches), so `/api/v1` keeps its JSON errors
and bearer tokens while the pages use a log-in cookie. Every asset (CSS, the small script) is
served from `/static`; nothing is fetched from elsewhere, so it works in an offline control
room. See docs/dashboard.md.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from server.api.errors import describe_validation
from server.core.config import ServerSettings
from server.core.db import Database
from server.errors import ServerError
from server.web import commissioning, live, pages, plans, reports, sessions, tickets
from server.web.auth import LoginRequired
from server.web.render import render

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "emu_session"


def _wants_fragment(request: Request) -> bool:
    return "fragment" in request.query_params or request.url.path == "/events"


def _install_error_pages(app: FastAPI) -> None:
    async def login_required(request: Request, exc: Exception) -> Response:
        if _wants_fragment(request) or request.method != "GET":
            return PlainTextResponse(str(exc), status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    async def server_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status", 500)
        if _wants_fragment(request):
            return PlainTextResponse(str(exc), status_code=status)
        return render(request, "error.html", {"status": status, "message": str(exc)},
                      status=status)

    async def bad_request(request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        message = describe_validation(errors)
        if _wants_fragment(request):
            return PlainTextResponse(message, status_code=422)
        return render(request, "error.html", {"status": 422, "message": message}, status=422)

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):  # an unknown API route stays JSON
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return render(request, "error.html", {"status": 404, "message": "No such page."},
                      status=404)

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(ServerError, server_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(404, not_found)


def create_web_app(
    settings: ServerSettings, db: Database, clock: Callable[[], datetime]
) -> FastAPI:
    """The dashboard application (mounted at `/` by the API app)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.db = db
    app.state.clock = clock
    app.state.live = live.LiveHub()
    app.state.features = {"tickets": ("/tickets", "Tickets"),
                          "sessions": ("/sessions", "Remote sessions"),
                          "plans": ("/plans", "Upgrade plans"),
                          "commissioning": ("/commissioning", "Commissioning"),
                          "sla": ("/sla", "SLA report")}
    secret = settings.secret_key
    if secret is None:  # only `emu demo` runs without one (see ServerSettings)
        secret = secrets.token_urlsafe(32)
    app.add_middleware(
        SessionMiddleware, secret_key=secret, session_cookie=SESSION_COOKIE,
        max_age=settings.web.session_max_age_s, same_site="lax",
        https_only=settings.web.secure_cookies,
    )
    _install_error_pages(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(pages.router)
    app.include_router(tickets.router)
    app.include_router(sessions.router)
    app.include_router(plans.router)
    app.include_router(commissioning.router)
    app.include_router(reports.router)
    app.include_router(live.router)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> HTMLResponse:
        return HTMLResponse(status_code=204)

    return app
