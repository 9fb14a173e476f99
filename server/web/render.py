"""Jinja2 rendering for the dashboard: whole pages, or one live block of a page.

A live region of a page is a named `{% block %}`; the browser re-fetches the page with
`?fragment=<block>` when the server says that region changed, and gets only that block's HTML,
rendered by the same template and data as the whole page, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from server.errors import NotFound
from server.web.auth import csrf_token, is_staff

TEMPLATES = Path(__file__).resolve().parent / "templates"

env = Environment(
    loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(("html",)),
    trim_blocks=True, lstrip_blocks=True, enable_async=False,
)


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """`3 min ago`, `2 h ago`, `5 d ago` (or `-`)."""
    if value is None:
        return "-"
    now = now or datetime.now(UTC)
    return duration(now - value) + " ago"


def duration(delta: timedelta | float) -> str:
    """A short human duration: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`."""
    s = int(delta.total_seconds() if isinstance(delta, timedelta) else delta)
    sign = "-" if s < 0 else ""
    s = abs(s)
    if s < 60:
        return f"{sign}{s} s"
    if s < 3600:
        return f"{sign}{s // 60} min"
    if s < 86400:
        return f"{sign}{s // 3600} h {s % 3600 // 60} min"
    return f"{sign}{s // 86400} d {s % 86400 // 3600} h"


def utc(value: datetime | None) -> str:
    """`YYYY-MM-DD HH:MM UTC` (or `-`)."""
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(value: datetime | None) -> str:
    """ISO-8601 UTC for `<time datetime=...>` and the countdown script."""
    return "" if value is None else value.astimezone(UTC).isoformat()


def number(value: float | None, digits: int = 1) -> str:
    """A reading for a table cell."""
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"


env.filters.update(ago=ago, duration=duration, utc=utc, iso=iso, number=number)

FAULT_CLASS_LABEL = {
    "A": "A · function lost", "B": "B · at risk", "C": "C · degraded", "D": "D · intermittent",
}
env.globals["FAULT_CLASS_LABEL"] = FAULT_CLASS_LABEL
env.globals["m"] = env.get_template("macros.html").module  # macros usable inside live blocks


def render(
    request: Request, template: str, context: Mapping[str, Any], *, status: int = 200
) -> HTMLResponse:
    """The page, or only the block named by `?fragment=` (404 for an unknown block)."""
    tpl = env.get_template(template)
    user = context.get("user")
    now: datetime = request.app.state.clock()
    ctx = {
        "request": request, "now": now, "csrf": csrf_token(request),
        "staff": user is not None and is_staff(user), "path": request.url.path,
        "features": request.app.state.features, **context,
    }
    fragment = request.query_params.get("fragment")
    if fragment:
        block = tpl.blocks.get(f"live_{fragment}")
        if block is None:
            raise NotFound(f"no live region {fragment!r} on this page")
        html = "".join(block(tpl.new_context(ctx)))
    else:
        html = tpl.render(ctx)
    headers = {"Cache-Control": "no-store"}
    return HTMLResponse(html, status_code=status, headers=headers)
