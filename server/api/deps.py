"""Request dependencies: the session, the caller, role checks, pagination, scoped look-ups.

Routes declare what they need as `Annotated` aliases (`SessionDep`, `CurrentUser`,
`AdminUser`, `PageDep`) and fetch site-owned objects through `get_visible`, so a route cannot
forget the caller's scope by accident: every query of site-owned data goes through
`visible_sites` (server/core/security.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import SQLModel, col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from server.commands.service import CommandService
from server.core.config import ServerSettings
from server.core.db import Database
from server.core.security import Caller, Role, Unauthorized, authenticate, visible_sites
from server.errors import Forbidden, NotFound
from server.models import User
from server.schemas import MAX_ID

M = TypeVar("M", bound=SQLModel)

MAX_PAGE = 1000
DEFAULT_PAGE = 100

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")


def get_db(request: Request) -> Database:
    """The process's database (set by create_app)."""
    db: Database = request.app.state.db
    return db


def get_settings(request: Request) -> ServerSettings:
    """The process's settings (set by create_app)."""
    settings: ServerSettings = request.app.state.settings
    return settings


def get_now(request: Request) -> datetime:
    """The current time from the app's injectable clock (token expiry, default ranges)."""
    now: datetime = request.app.state.clock()
    return now


async def get_session(db: Annotated[Database, Depends(get_db)]) -> AsyncIterator[AsyncSession]:
    """One session per request; routes commit their writes, anything else is rolled back."""
    async with db.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
NowDep = Annotated[datetime, Depends(get_now)]


async def get_caller(
    session: SessionDep,
    now: NowDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The authenticated caller; 401 without a valid, unexpired bearer token."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return await authenticate(session, credentials.credentials, now)


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_current_user(caller: CallerDep) -> User:
    """The authenticated user."""
    return caller.user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require_role(*roles: Role) -> Callable[[User], Coroutine[Any, Any, User]]:
    """A dependency admitting only users with one of `roles` (403 for the others)."""
    allowed = frozenset(roles)

    async def check(user: CurrentUser) -> User:
        if Role(user.role) not in allowed:
            raise Forbidden(f"requires role {' or '.join(sorted(allowed))}")
        return user

    return check


AdminUser = Annotated[User, Depends(require_role(Role.ADMIN))]
StaffUser = Annotated[User, Depends(require_role(Role.ADMIN, Role.ENGINEER))]


def id_of(row: Any) -> int:
    """The primary key of a row that came from (or was flushed to) the database."""
    value = row.id
    if not isinstance(value, int):
        raise TypeError(f"{type(row).__name__} has no id yet (not flushed?)")
    return value


@dataclass(frozen=True)
class Paging:
    """`limit` and `offset` of a list request."""

    limit: int
    offset: int


def get_paging(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")] = DEFAULT_PAGE,
    offset: Annotated[int, Query(ge=0, le=MAX_ID, description="rows to skip")] = 0,
) -> Paging:
    """Pagination parameters shared by every list."""
    return Paging(limit=limit, offset=offset)


PageDep = Annotated[Paging, Depends(get_paging)]

IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
IdQuery = Annotated[int | None, Query(ge=1, le=MAX_ID)]


async def paginate(
    session: AsyncSession, stmt: SelectOfScalar[M], page: Paging, *order: Any
) -> tuple[list[M], int]:
    """Rows of `stmt` for `page` in `order`, and the total number of rows."""
    total = (await session.exec(select(func.count()).select_from(stmt.subquery()))).one()
    rows = await session.exec(stmt.order_by(*order).limit(page.limit).offset(page.offset))
    return list(rows.all()), int(total)


async def get_visible(
    session: AsyncSession, user: User, model: type[M], obj_id: int, site_id: Any
) -> M:
    """The `model` row with `obj_id` if `user` may see its site (column `site_id`), else 404."""
    row = (
        await session.exec(
            select(model).where(col(model.id) == obj_id).where(visible_sites(user, site_id))  # type: ignore[attr-defined]
        )
    ).first()
    if row is None:
        raise NotFound(f"{model.__name__.lower()} {obj_id} not found")
    return row


def get_commands(request: Request) -> CommandService:
    """The process's command service (`app.state.commands`), for routes that order agents."""
    commands: CommandService = request.app.state.commands
    return commands


CommandsDep = Annotated[CommandService, Depends(get_commands)]
