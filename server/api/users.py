"""`/api/v1/users`: who may use the API, and their bearer tokens.

Admins manage users (a customer user is bound to its organisation) and may issue a user's
first token; every user lists, creates and revokes its own tokens under `/users/me/tokens`.
A token's secret is returned once, at creation; only its SHA-256 is kept.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Response
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.api.deps import (
    AdminUser,
    CallerDep,
    CurrentUser,
    IdPath,
    IdQuery,
    NowDep,
    PageDep,
    SessionDep,
    id_of,
    paginate,
)
from server.core.passwords import check_login, set_password
from server.core.security import Role, hash_token, new_token
from server.errors import Conflict, Forbidden, InvalidInput, NotFound
from server.models import ApiToken, Organisation, User
from server.schemas import (
    Page,
    PasswordChange,
    PasswordSet,
    RoleName,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    UserCreate,
    UserPublic,
    UserUpdate,
)

router = APIRouter(prefix="/users", tags=["users"])


async def _check_membership(session: AsyncSession, role: str, org_id: int | None) -> None:
    if org_id is not None and await session.get(Organisation, org_id) is None:
        raise InvalidInput(f"organisation {org_id} does not exist")
    if role == Role.CUSTOMER and org_id is None:
        raise InvalidInput("a customer user needs org_id (its organisation)")


async def _user(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


async def _issue(
    session: AsyncSession, user_id: int, body: TokenCreate, now: datetime
) -> TokenCreated:
    secret = new_token()
    expires = None if body.expires_in_days is None else now + timedelta(days=body.expires_in_days)
    token = ApiToken(user_id=user_id, token_hash=hash_token(secret), name=body.name,
                     created_at=now, expires_at=expires)
    session.add(token)
    await session.commit()
    return TokenCreated.model_validate(token, update={"token": secret})


async def _tokens(session: AsyncSession, user_id: int, page: PageDep) -> Page[ApiToken]:
    stmt = select(ApiToken).where(ApiToken.user_id == user_id)
    rows, total = await paginate(session, stmt, page, col(ApiToken.id))
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


async def _revoke(session: AsyncSession, user_id: int, token_id: int) -> Response:
    token = await session.get(ApiToken, token_id)
    if token is None or token.user_id != user_id:
        raise NotFound(f"token {token_id} not found")
    await session.delete(token)
    await session.commit()
    return Response(status_code=204)


# --- the caller itself ---------------------------------------------------------------------


@router.get("/me", response_model=UserPublic)
async def get_me(user: CurrentUser) -> User:
    """The authenticated user."""
    return user


@router.post("/me/password", status_code=204)
async def change_my_password(session: SessionDep, user: CurrentUser, body: PasswordChange
                             ) -> Response:
    """Change the caller's dashboard password (the current one is required if set)."""
    if user.password_hash is not None and (
        body.current_password is None
        or await check_login(session, user.name, body.current_password) is None
    ):
        raise Forbidden("the current password is wrong")
    await set_password(session, user, body.new_password)
    await session.commit()
    return Response(status_code=204)


@router.get("/me/tokens", response_model=Page[TokenPublic])
async def list_my_tokens(session: SessionDep, user: CurrentUser, page: PageDep) -> Page[ApiToken]:
    """The caller's tokens (metadata only)."""
    return await _tokens(session, id_of(user), page)


@router.post("/me/tokens", response_model=TokenCreated, status_code=201)
async def create_my_token(
    session: SessionDep, user: CurrentUser, now: NowDep, body: TokenCreate
) -> TokenCreated:
    """A new token for the caller; the secret is in the answer, and only there."""
    return await _issue(session, id_of(user), body, now)


@router.delete("/me/tokens/{token_id}", status_code=204)
async def revoke_my_token(session: SessionDep, caller: CallerDep, token_id: IdPath) -> Response:
    """Revoke one of the caller's tokens (possibly the one in use)."""
    return await _revoke(session, id_of(caller.user), token_id)


# --- administration ------------------------------------------------------------------------


@router.get("", response_model=Page[UserPublic])
async def list_users(
    session: SessionDep,
    _admin: AdminUser,
    page: PageDep,
    role: RoleName | None = None,
    org_id: IdQuery = None,
) -> Page[User]:
    """Every user (admin)."""
    stmt = select(User)
    if role is not None:
        stmt = stmt.where(User.role == role)
    if org_id is not None:
        stmt = stmt.where(User.org_id == org_id)
    rows, total = await paginate(session, stmt, page, col(User.id))
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.post("", response_model=UserPublic, status_code=201)
async def create_user(session: SessionDep, _admin: AdminUser, body: UserCreate) -> User:
    """Create a user (admin); give it a token with POST /users/{id}/tokens."""
    await _check_membership(session, body.role, body.org_id)
    if (await session.exec(select(User).where(User.name == body.name))).first() is not None:
        raise Conflict(f"a user named {body.name!r} exists already")
    user = User.model_validate(body)
    session.add(user)
    await session.commit()
    return user


@router.get("/{user_id}", response_model=UserPublic)
async def get_user(session: SessionDep, _admin: AdminUser, user_id: IdPath) -> User:
    """One user (admin)."""
    return await _user(session, user_id)


@router.patch("/{user_id}", response_model=UserPublic)
async def update_user(
    session: SessionDep, admin: AdminUser, user_id: IdPath, body: UserUpdate
) -> User:
    """Change a user's role, organisation or e-mail (admin; not one's own role)."""
    user = await _user(session, user_id)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("role") is None:
        changes.pop("role", None)
    role = changes.get("role", user.role)
    if user.id == admin.id and role != user.role:
        raise Conflict("an admin cannot change its own role")
    await _check_membership(session, role, changes.get("org_id", user.org_id))
    user.sqlmodel_update(changes)
    session.add(user)
    await session.commit()
    return user


@router.delete("/{user_id}", status_code=204)
async def delete_user(session: SessionDep, admin: AdminUser, user_id: IdPath) -> Response:
    """Delete a user and its tokens (admin; not oneself)."""
    user = await _user(session, user_id)
    if user.id == admin.id:
        raise Conflict("an admin cannot delete itself")
    await session.exec(delete(ApiToken).where(col(ApiToken.user_id) == user_id))
    await session.delete(user)
    await session.commit()
    return Response(status_code=204)


@router.post("/{user_id}/password", status_code=204)
async def set_user_password(
    session: SessionDep, _admin: AdminUser, user_id: IdPath, body: PasswordSet
) -> Response:
    """Set a user's dashboard password (admin): how a new user gets its first log-in."""
    await set_password(session, await _user(session, user_id), body.password)
    await session.commit()
    return Response(status_code=204)


@router.get("/{user_id}/tokens", response_model=Page[TokenPublic])
async def list_user_tokens(
    session: SessionDep, _admin: AdminUser, user_id: IdPath, page: PageDep
) -> Page[ApiToken]:
    """A user's tokens (admin)."""
    await _user(session, user_id)
    return await _tokens(session, user_id, page)


@router.post("/{user_id}/tokens", response_model=TokenCreated, status_code=201)
async def create_user_token(
    session: SessionDep, _admin: AdminUser, now: NowDep, user_id: IdPath, body: TokenCreate
) -> TokenCreated:
    """Issue a token for a user (admin): how a new user gets its first one."""
    await _user(session, user_id)
    return await _issue(session, user_id, body, now)


@router.delete("/{user_id}/tokens/{token_id}", status_code=204)
async def revoke_user_token(
    session: SessionDep, _admin: AdminUser, user_id: IdPath, token_id: IdPath
) -> Response:
    """Revoke a user's token (admin)."""
    return await _revoke(session, user_id, token_id)
