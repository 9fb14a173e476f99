"""Who is calling and what they may see: bearer tokens, roles, and site scoping.

Tokens are random (`secrets.token_urlsafe(32)`) and only their SHA-256 is stored, so a copy of
the database does not hand out log-ins. Roles: `admin` does everything, `engineer` (the
vendor's support staff) reads every site, `customer` sees only its own organisation's sites.
Scoping is one WHERE clause (`visible_sites`) that every query of site-owned data carries;
an object outside the caller's scope is "not found", never "forbidden", so its existence does
not leak.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.core.db import Database
from server.errors import ServerError
from server.models import ApiToken, Organisation, Site, User

log = logging.getLogger(__name__)

LAST_USED_RESOLUTION = timedelta(seconds=60)
"""`ApiToken.last_used` is written at most this often per token (reads must stay cheap)."""

ADMIN_NAME = "admin"
BOOTSTRAP_TOKEN_NAME = "bootstrap"  # noqa: S105 - a label, not a secret


class Unauthorized(ServerError):
    """No credentials, or credentials that are unknown or expired (401)."""

    status = 401


class Role(StrEnum):
    """What a user may do; see the module docstring."""

    ADMIN = "admin"
    ENGINEER = "engineer"
    CUSTOMER = "customer"


STAFF = frozenset({Role.ADMIN, Role.ENGINEER})
"""Roles that see every site."""


def new_token() -> str:
    """A fresh bearer token (shown to its owner once, never stored)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the database keeps of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Caller:
    """The authenticated user of one request, and the token it came with."""

    user: User
    token_id: int

    @property
    def role(self) -> Role:
        """The user's role as an enum (unknown roles were refused at log-in)."""
        return Role(self.user.role)


async def authenticate(session: AsyncSession, token: str, now: datetime) -> Caller:
    """The user a bearer token belongs to; Unauthorized if unknown or expired.

    Touches `last_used` at most every LAST_USED_RESOLUTION and commits that itself.
    """
    row = (
        await session.exec(
            select(ApiToken, User)
            .join(User, col(User.id) == col(ApiToken.user_id))
            .where(ApiToken.token_hash == hash_token(token))
        )
    ).first()
    if row is None:
        raise Unauthorized("invalid token")
    api_token, user = row
    if api_token.expires_at is not None and api_token.expires_at <= now:
        raise Unauthorized("token expired")
    if user.role not in Role.__members__.values():
        log.warning("user %s has unknown role %r; refusing its token", user.name, user.role)
        raise Unauthorized("invalid token")
    if api_token.last_used is None or now - api_token.last_used >= LAST_USED_RESOLUTION:
        await session.exec(
            sa.update(ApiToken).where(col(ApiToken.id) == api_token.id).values(last_used=now)
        )
        await session.commit()
    if api_token.id is None:  # pragma: no cover - rows read back always have their key
        raise Unauthorized("invalid token")
    return Caller(user=user, token_id=api_token.id)


def visible_sites(user: User, site_id: Any) -> sa.ColumnElement[bool]:
    """WHERE clause: the site id column `site_id` names a site `user` may see.

    Staff see every site (the clause is TRUE); a customer sees its organisation's sites; a
    customer without an organisation sees none.
    """
    if user.role in STAFF:
        return sa.true()
    if user.org_id is None:
        return sa.false()
    own = select(col(Site.id)).where(col(Site.org_id) == user.org_id)
    clause: sa.ColumnElement[bool] = site_id.in_(own.scalar_subquery())
    return clause


def visible_orgs(user: User, org_id: Any) -> sa.ColumnElement[bool]:
    """WHERE clause: the organisation id column `org_id` is one `user` may see."""
    if user.role in STAFF:
        return sa.true()
    if user.org_id is None:
        return sa.false()
    clause: sa.ColumnElement[bool] = org_id == user.org_id
    return clause


async def ensure_admin(db: Database, token: str) -> bool:
    """First start: create user "admin" holding `token` unless an admin exists already.

    Returns True if it created the admin. Safe when several server processes start at once:
    the loser of the race sees the unique constraint and leaves the winner's admin alone.
    """
    async with db.session() as session:
        existing = (
            await session.exec(select(User).where(User.role == Role.ADMIN.value).limit(1))
        ).first()
        if existing is not None:
            return False
    try:
        async with db.session() as session:
            vendor = (
                await session.exec(select(Organisation).where(Organisation.kind == "vendor"))
            ).first()
            user = User(
                name=ADMIN_NAME,
                role=Role.ADMIN.value,
                org_id=vendor.id if vendor is not None else None,
            )
            session.add(user)
            await session.flush()
            if user.id is None:  # pragma: no cover - a flushed row has its key
                raise RuntimeError("the admin user got no id")
            session.add(
                ApiToken(user_id=user.id, token_hash=hash_token(token), name=BOOTSTRAP_TOKEN_NAME)
            )
    except IntegrityError:
        log.info("bootstrap admin was created concurrently (or the name is taken); skipping")
        return False
    log.info("created the bootstrap admin user %r", ADMIN_NAME)
    return True
