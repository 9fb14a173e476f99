"""Store-and-forward on disk: every batch is in SQLite before it is published.

Durability policy: WAL journal with `synchronous=FULL`, so each committed batch is fsynced
before `append` returns; a batch that `append` returned for survives `kill -9` and a power
cut. Batches get their `seq` inside the same transaction that stores them, so a replay after
a crash carries the same `seq` and the server can drop duplicates.

Bounded: when the file's payloads pass `max_bytes`, the oldest telemetry batches are dropped
and a `spool_dropped` event (itself spooled) says how many points and which `seq` range.

SQLite is blocking, so every call runs on one dedicated worker thread; the event loop only
awaits it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.errors import SpoolError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    points INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen_command (id TEXT PRIMARY KEY, expires REAL NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One spooled batch."""

    id: int
    stream: str
    seq: int
    created: float
    points: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """What a full spool had to drop."""

    batches: int
    points: int
    first_seq: int
    last_seq: int


class Spool:
    """The on-disk outbox of one agent."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._bytes = 0

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def open(self) -> None:
        """Open (or create) the spool file."""
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # Debian builds default to secure_delete=ON, which rewrites every freed page:
            # acknowledged batches would cost ten times more to forget
            db.execute("PRAGMA secure_delete=FAST")
            db.executescript(SCHEMA)
            row = db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        self._db = db
        self._bytes = int(row[0])

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (only used on the spool thread)."""
        if self._db is None:
            raise SpoolError("the spool is not open")
        return self._db

    async def append(
        self, stream: str, make_payload: Callable[[int], bytes], points: int
    ) -> tuple[int, Dropped | None]:
        """Store one batch built for the next `seq` of `stream`; returns the seq and any drop."""
        return await self._run(lambda: self._append(stream, make_payload, points))

    def _append(
        self, stream: str, make_payload: Callable[[int], bytes], points: int
    ) -> tuple[int, Dropped | None]:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT value FROM meta WHERE key = ?", (f"seq:{stream}",)).fetchone()
            seq = (row[0] if row else 0) + 1
            payload = make_payload(seq)
            db.execute(
                "INSERT INTO outbox (stream, seq, created, points, payload) VALUES (?,?,?,?,?)",
                (stream, seq, time.time(), points, payload),
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (f"seq:{stream}", seq),
            )
            self._bytes += len(payload)
            dropped = self._trim() if self._bytes > self.max_bytes else None
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise SpoolError(f"cannot write spool {self.path}: {exc}") from exc
        return seq, dropped

    def _trim(self) -> Dropped | None:
        """Drop the oldest telemetry batches until under the limit (events are kept)."""
        db = self.db
        batches = points = 0
        first = last = 0
        rows = db.execute(
            "SELECT id, seq, points, LENGTH(payload) FROM outbox WHERE stream = 'telemetry' "
            "ORDER BY id"
        )
        doomed = []
        for rid, seq, n, size in rows:
            if self._bytes <= self.max_bytes * 0.9:
                break
            doomed.append(rid)
            self._bytes -= size
            batches += 1
            points += n
            first = first or seq
            last = seq
        if not doomed:
            return None
        db.executemany("DELETE FROM outbox WHERE id = ?", ((r,) for r in doomed))
        return Dropped(batches, points, first, last)

    async def peek(self, after_id: int, limit: int) -> list[Row]:
        """The oldest batches with id above `after_id`, in order."""
        return await self._run(lambda: self._peek(after_id, limit))

    def _peek(self, after_id: int, limit: int) -> list[Row]:
        cur = self.db.execute(
            "SELECT id, stream, seq, created, points, payload FROM outbox WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [Row(*r) for r in cur]

    async def delete(self, ids: Sequence[int]) -> None:
        """Forget batches the broker acknowledged."""
        if ids:
            await self._run(lambda: self._delete(ids))

    def _delete(self, ids: Sequence[int]) -> None:
        db = self.db
        id_list = json.dumps(list(ids))
        try:
            db.execute("BEGIN IMMEDIATE")
            size = db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox "
                "WHERE id IN (SELECT value FROM json_each(?))",
                (id_list,),
            ).fetchone()[0]
            db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))", (id_list,)
            )
            db.execute("COMMIT")
            self._bytes -= size
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise SpoolError(f"cannot forget acknowledged batches in {self.path}: {exc}") from exc

    async def remember_command(self, command_id: str, expires: float, now: float) -> bool:
        """Record a command as taken; False if it was taken before (a replay).

        Kept in the spool's file so that a restart does not forget what was done; rows are
        forgotten once the command has expired, since an expired command is refused anyway.
        """
        return await self._run(lambda: self._remember(command_id, expires, now))

    def _remember(self, command_id: str, expires: float, now: float) -> bool:
        db = self.db
        try:
            db.execute("DELETE FROM seen_command WHERE expires < ?", (now,))
            cur = db.execute("INSERT OR IGNORE INTO seen_command (id, expires) VALUES (?, ?)",
                             (command_id, expires))
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot record command {command_id} in {self.path}: {exc}") from exc
        return cur.rowcount == 1

    async def depth(self) -> tuple[int, int, float | None]:
        """(batches, points, creation time of the oldest) waiting in the spool."""
        return await self._run(self._depth)

    def _depth(self) -> tuple[int, int, float | None]:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(points), 0), MIN(created) FROM outbox"
        ).fetchone()
        return int(row[0]), int(row[1]), row[2]

    async def close(self) -> None:
        """Close the file and stop the worker thread."""
        if self._db is not None:
            await self._run(self.db.close)
            self._db = None
        self._pool.shutdown(wait=True)
