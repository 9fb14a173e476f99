"""The database URL the tests use: `EMU_TEST_DATABASE_URL` in CI, else a throwaway SQLite file.

Only URLs are handled here: no driver is imported until a test builds an engine, so the suite
collects and runs its other tests even where psycopg or aiosqlite is not installed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.support.net import accepts_connections
from tests.support.waiting import wait_until

REACH_TIMEOUT = 10.0


def sqlite_url(directory: Path) -> str:
    """An async SQLite URL for a fresh database file in `directory`."""
    return f"sqlite+aiosqlite:///{directory / 'emu-test.db'}"


def external_database(url: str) -> str:
    """Return `url` after checking that its server accepts TCP connections (SQLite passes)."""
    parts = urlsplit(url)
    if not parts.scheme:
        raise ValueError(f"EMU_TEST_DATABASE_URL must be a SQLAlchemy URL, got {url!r}")
    if parts.scheme.startswith("sqlite"):
        return url
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 5432
    wait_until(
        lambda: accepts_connections(host, port),
        REACH_TIMEOUT,
        f"the database at {host}:{port} (EMU_TEST_DATABASE_URL) to accept connections",
    )
    return url


@contextmanager
def fresh_database(base_url: str, directory: Path) -> Iterator[str]:
    """A new, empty database for one test session, dropped afterwards.

    PostgreSQL: `CREATE DATABASE emu_t_<random>` on the server of `base_url` (so tests never
    see a schema left behind by another run); SQLite: a new file in `directory`.
    """
    parts = urlsplit(base_url)
    if parts.scheme.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{directory / f'emu-{secrets.token_hex(4)}.db'}"
        return
    import psycopg  # only when a PostgreSQL test database is asked for

    name = f"emu_t_{secrets.token_hex(6)}"
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
