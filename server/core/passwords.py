"""Dashboard passwords: argon2id hashes (argon2-cffi's defaults, RFC 9106).

Hashing and verifying take tens of milliseconds on purpose, so both run in a worker thread,
off the event loop. An unknown user name costs the same as a wrong password (a dummy hash is
verified), so response times do not tell which names exist. Hashes made with older parameters
are upgraded at the next successful log-in.
"""

from __future__ import annotations

import asyncio
import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.core.security import Role
from server.errors import InvalidInput
from server.models import User

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 200

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user name is unknown, so both cases take the same time."""
    return _hasher.hash(secrets.token_urlsafe(16))


def check_password_rules(password: str) -> None:
    """InvalidInput unless the password is long enough (and not absurdly long)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidInput(f"a password has at most {MAX_PASSWORD_LENGTH} characters")


async def hash_password(password: str) -> str:
    """The argon2id hash of `password` (computed in a worker thread)."""
    check_password_rules(password)
    return await asyncio.to_thread(_hasher.hash, password)


async def set_password(session: AsyncSession, user: User, password: str) -> None:
    """Store a new password for `user` (the caller commits)."""
    user.password_hash = await hash_password(password)
    session.add(user)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


async def check_login(session: AsyncSession, name: str, password: str) -> User | None:
    """The user named `name` if `password` is its password, else None (same cost either way)."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return None
    user = (await session.exec(select(User).where(User.name == name))).first()
    stored = user.password_hash if user is not None else None
    if not await asyncio.to_thread(_verify, stored, password):
        return None
    if user is None or user.role not in Role.__members__.values():
        return None
    if stored is not None and _hasher.check_needs_rehash(stored):
        await set_password(session, user, password)
        await session.commit()
    return user
