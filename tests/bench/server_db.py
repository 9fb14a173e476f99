"""Scratch databases for the server benchmarks, and the raw bulk inserts they compare against.

PostgreSQL: `EMU_BENCH_PG_URL` (default postgresql+psycopg://postgres@127.0.0.1:5432/test
names the server; a `emu_bench_<random>` database is created there and dropped after).
SQLite: a file in a temporary directory. Both are migrated with the server's own migrations.
The baselines write into `telemetry_raw`, a copy of `telemetry` with the same columns and
primary key (the only index the table has), with nothing between the driver and the rows.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from server.core.db import migrate_sync

PG_URL_ENV = "EMU_BENCH_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

RawRow = tuple[int, datetime, float | None, str | None, int]

_RAW_TABLE_SQLITE = (
    "CREATE TABLE telemetry_raw (series_id INTEGER NOT NULL, ts DATETIME NOT NULL, value FLOAT,"
    " text VARCHAR(200), quality SMALLINT NOT NULL, PRIMARY KEY (series_id, ts))"
)


def pg_url() -> str:
    """The PostgreSQL server to benchmark against (skips when nothing listens there)."""
    url = os.environ.get(PG_URL_ENV) or os.environ.get("EMU_TEST_DATABASE_URL") or DEFAULT_PG_URL
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgresql"):
        pytest.skip(f"{PG_URL_ENV} is not a PostgreSQL URL")
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2).close()
    except OSError:
        pytest.skip(f"no PostgreSQL at {parts.hostname}:{parts.port or 5432}")
    return url


def _libpq(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, ""))


@contextmanager
def scratch_pg() -> Iterator[str]:
    """A migrated scratch PostgreSQL database (SQLAlchemy URL) with `telemetry_raw`."""
    import psycopg

    base = pg_url()
    parts = urlsplit(base)
    name = f"emu_bench_{secrets.token_hex(5)}"
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    try:
        migrate_sync(url)
        with psycopg.connect(_libpq(url), autocommit=True) as conn:
            conn.execute("CREATE TABLE telemetry_raw (LIKE telemetry INCLUDING ALL)")
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_sqlite(directory: Path) -> Iterator[str]:
    """A migrated SQLite file (SQLAlchemy URL) with `telemetry_raw`."""
    path = directory / f"bench-{secrets.token_hex(4)}.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrate_sync(url)
    with sqlite3.connect(path) as conn:
        conn.execute(_RAW_TABLE_SQLITE)
    yield url


class RawPg:
    """Binary COPY through psycopg into `telemetry_raw`: the fastest plain bulk insert."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(_libpq(url))

    def insert(self, chunks: Sequence[Sequence[RawRow]]) -> None:
        """One transaction per chunk."""
        for rows in chunks:
            with self.conn.cursor() as cur, cur.copy(
                "COPY telemetry_raw (series_id, ts, value, text, quality) FROM STDIN"
                " (FORMAT BINARY)"
            ) as copy:
                copy.set_types(("int4", "timestamptz", "float8", "text", "int2"))
                for row in rows:
                    copy.write_row(row)
            self.conn.commit()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class RawSqlite:
    """sqlite3 executemany into `telemetry_raw` with the server's pragmas (WAL, NORMAL)."""

    def __init__(self, url: str) -> None:
        self.conn = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")

    def insert(self, chunks: Sequence[Sequence[tuple[int, str, float | None, str | None, int]]]
               ) -> None:
        """One transaction per chunk."""
        for rows in chunks:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT INTO telemetry_raw (series_id, ts, value, text, quality)"
                " VALUES (?, ?, ?, ?, ?)", rows)
            self.conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
