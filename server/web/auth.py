"""Dashboard log-in: signed session cookies that expire, CSRF tokens, role checks.

Passwords are checked by server/core/passwords.py (argon2id). The session is
Starlette's signed cookie (itsdangerous): it holds the user id, when the log-in was made (from
the app's injectable clock, so expiry is testable) and the CSRF token. A log-in expires
`web.session_max_age_s` after it was made, whatever the activity. Every form carries the
session's CSRF token (synchronizer-token pattern) and every POST is refused without it, so
another site cannot submit forms with the user's cookie; the cookie is also SameSite=Lax.
The API is not affected: it authenticates bearer tokens only, never the cookie.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Request

from server.core.passwords import check_login, set_password
from server.core.security import Role
from server.errors import Forbidden, ServerError
from server.models import User

__all__ = ["check_login", "set_password"]

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(ServerError):
    """No log-in, or it expired: pages redirect to the log-in form, fragments answer 401."""

    status = 401


class CsrfError(Forbidden):
    """A form arrived without the session's CSRF token."""


# --- the browser session -------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (the log-in form needs one too)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def start_session(request: Request, user: User, now: datetime) -> None:
    """Log `user` in: a fresh session (new CSRF token, so a planted one is useless)."""
    request.session.clear()
    request.session.update({"uid": user.id, "iat": now.timestamp(),
                            "csrf": secrets.token_urlsafe(32)})


def end_session(request: Request) -> None:
    """Log out."""
    request.session.clear()


async def check_csrf(request: Request) -> None:
    """Dependency of every POST: the form field (or header) must equal the session's token."""
    expected = request.session.get("csrf")
    sent: Any = request.headers.get(CSRF_HEADER)
    if sent is None:
        form = await request.form()
        sent = form.get(CSRF_FIELD)
    if not isinstance(expected, str) or not isinstance(sent, str) or not hmac.compare_digest(
        expected.encode(), sent.encode()
    ):
        raise CsrfError("the form has expired or did not come from this site; reload and retry")


async def current_user(request: Request) -> User:
    """The logged-in user; LoginRequired if none or if the log-in is older than the max age."""
    uid, iat = request.session.get("uid"), request.session.get("iat")
    if not isinstance(uid, int) or not isinstance(iat, int | float):
        raise LoginRequired("please log in")
    settings = request.app.state.settings
    now: datetime = request.app.state.clock()
    if now.timestamp() - iat > settings.web.session_max_age_s:
        request.session.clear()
        raise LoginRequired("your log-in has expired; please log in again")
    db = request.app.state.db
    async with db.session() as session:
        user: User | None = await session.get(User, uid)
    if user is None or user.role not in Role.__members__.values():
        request.session.clear()
        raise LoginRequired("please log in")
    return user


WebUser = Annotated[User, Depends(current_user)]
Csrf = Depends(check_csrf)


def is_staff(user: User) -> bool:
    """Vendor staff (admin, engineer) rather than a customer."""
    return user.role in (Role.ADMIN, Role.ENGINEER)


async def staff_user(user: WebUser) -> User:
    """Only vendor staff (403 for customers)."""
    if not is_staff(user):
        raise Forbidden("this page is for the vendor's staff")
    return user


StaffWebUser = Annotated[User, Depends(staff_user)]
