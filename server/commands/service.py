"""Sending signed commands to agents and following them to their outcome.

    send() --row (pending) + after-commit--> publish --PUBACK--> sent
    agent --cmd/ack--> ingest worker --handle_ack()--> progress | ok | error | rejected
    scheduler --tick()--> republish the unanswered, expire the stale

The database row is the truth: a command is published only after the transaction that
created it commits (an agent's answer never finds no row), and the scheduler republishes
what no agent answered within `redeliver_s` (the agent refuses a second run of the same id,
so a republish is harmless) and marks as `expired` what outlived its validity. Features
subscribe to answers per kind with `on_ack(kind, callback)` and to expiry with `on_expired`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from protocols.commands import sign_command
from protocols.messages import AckResult, Command, CommandAck, CommandKind
from protocols.signing import Ed25519PrivateKey, public_key_text
from protocols.topics import TopicKind, topic
from server.commands.keys import load_or_create_key
from server.commands.models import CommandRecord
from server.commands.publisher import MqttPublisher, PublishError
from server.core.config import ServerSettings
from server.core.db import Database
from server.errors import InvalidInput, NotFound
from server.models import Site

log = logging.getLogger(__name__)

AckCallback = Callable[[AsyncSession, CommandRecord, CommandAck], Awaitable[None]]
ExpiryCallback = Callable[[AsyncSession, CommandRecord], Awaitable[None]]
Publish = Callable[[str, bytes], Awaitable[None]]
TICK_BATCH = 200


class CommandService:
    """Signs, stores, publishes and follows commands; one per server process."""

    def __init__(self, settings: ServerSettings, db: Database, *,
                 publish: Publish | None = None, clock: Clock | None = None,
                 key: Ed25519PrivateKey | None = None) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock or SystemClock()
        self._key = key
        self._publisher: MqttPublisher | None = None
        self._publish = publish
        self._ack_callbacks: dict[str, list[AckCallback]] = {}
        self._expiry_callbacks: dict[str, list[ExpiryCallback]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- keys -----------------------------------------------------------------------------
    @property
    def key(self) -> Ed25519PrivateKey:
        """The signing key (loaded, or created, on first use)."""
        if self._key is None:
            self._key = load_or_create_key(self.settings.command_key_path)
        return self._key

    async def load_key(self) -> None:
        """Load (or create) the key off the event loop; call at start-up."""
        if self._key is None:
            self._key = await asyncio.to_thread(load_or_create_key,
                                                self.settings.command_key_path)

    @property
    def public_key(self) -> str:
        """What agents must trust (base64 raw Ed25519), handed out at enrolment."""
        return public_key_text(self.key)

    # -- subscriptions --------------------------------------------------------------------
    def on_ack(self, kind: CommandKind, callback: AckCallback) -> None:
        """Call `callback` for every answer (progress and final) to commands of `kind`."""
        self._ack_callbacks.setdefault(kind.value, []).append(callback)

    def on_expired(self, kind: CommandKind, callback: ExpiryCallback) -> None:
        """Call `callback` when a command of `kind` expires unanswered."""
        self._expiry_callbacks.setdefault(kind.value, []).append(callback)

    # -- sending --------------------------------------------------------------------------
    async def send(self, session: AsyncSession, site_code: str, kind: CommandKind,
                   args: dict[str, Any], ttl_s: float | None = None, *,
                   user_id: int | None = None) -> Command:
        """Sign and store a command; it is published once `session` commits."""
        site = (await session.exec(select(Site).where(Site.code == site_code))).first()
        if site is None or site.id is None:
            raise NotFound(f"no site {site_code!r}")
        ttl = self.settings.commands.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise InvalidInput("a command needs a positive validity (ttl_s)")
        now = self.clock.now()
        cmd = sign_command(Command(id=uuid.uuid4(), site=site_code, kind=kind, issued_at=now,
                                   expires_at=now + timedelta(seconds=ttl), args=args), self.key)
        row = CommandRecord(id=str(cmd.id), site_id=site.id, kind=kind.value,
                            args=dict(cmd.args), payload=cmd.to_bytes().decode("utf-8"),
                            issued_at=now, expires_at=cmd.expires_at, created_by=user_id,
                            updated_at=now)
        session.add(row)
        await session.flush()
        sa.event.listen(session.sync_session, "after_commit",
                        lambda _s: self._spawn(self._deliver(row.id)), once=True)
        return cmd

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, command_id: str) -> None:
        """Publish a committed command and note that the broker has it."""
        async with self.db.session() as session:
            row = await session.get(CommandRecord, command_id)
            if row is None or row.final:
                return
            site = await session.get(Site, row.site_id)
            if site is None:
                return
            payload, code = row.payload.encode("utf-8"), site.code
        try:
            await self._publish_raw(topic(code, TopicKind.CMD), payload)
        except PublishError as exc:
            log.warning("commands: %s not published yet (%s); the scheduler will retry",
                        command_id, exc)
            return
        async with self.db.session() as session:
            row = await session.get(CommandRecord, command_id)
            if row is None:
                return
            now = self.clock.now()
            row.sends += 1
            row.sent_at = now
            if row.state == "pending":
                row.state = "sent"
            row.updated_at = now
            session.add(row)

    async def _publish_raw(self, topic_name: str, payload: bytes) -> None:
        if self._publish is not None:
            await self._publish(topic_name, payload)
            return
        if self._publisher is None:
            self._publisher = MqttPublisher(self.settings.mqtt)
        await self._publisher.publish(topic_name, payload)

    # -- answers --------------------------------------------------------------------------
    async def handle_ack(self, session: AsyncSession, site: Site, ack: CommandAck) -> bool:
        """Apply an agent's answer (called by ingest in its transaction); False if unknown."""
        row = await session.get(CommandRecord, str(ack.command_id), with_for_update=True)
        if row is None or row.site_id != site.id:
            log.warning("commands: an answer from %s for unknown command %s", site.code,
                        ack.command_id)
            return False
        if row.final:
            return True  # a redelivered answer, or one after expiry: nothing changes
        if ack.result is AckResult.PROGRESS:
            row.state = "progress"
            row.progress = dict(ack.detail)
        else:
            row.state = ack.result.value
            row.result = dict(ack.detail)
            row.acked_at = ack.ts
        row.updated_at = self.clock.now()
        session.add(row)
        for callback in self._ack_callbacks.get(row.kind, ()):
            await callback(session, row, ack)
        return True

    # -- housekeeping ---------------------------------------------------------------------
    async def tick(self, now: datetime | None = None) -> tuple[int, int]:
        """Expire stale commands and republish unanswered ones; (expired, republished)."""
        now = now or self.clock.now()
        expired = 0
        async with self.db.session() as session:
            stale = await session.exec(
                select(CommandRecord)
                .where(col(CommandRecord.state).in_(("pending", "sent", "progress")),
                       CommandRecord.expires_at <= now)
                .limit(TICK_BATCH).with_for_update(skip_locked=True))
            for row in stale.all():
                row.state = "expired"
                row.updated_at = now
                session.add(row)
                expired += 1
                for callback in self._expiry_callbacks.get(row.kind, ()):
                    await callback(session, row)
        cutoff = now - timedelta(seconds=self.settings.commands.redeliver_s)
        async with self.db.session() as session:
            due = (await session.exec(
                select(CommandRecord.id)
                .where(col(CommandRecord.state).in_(("pending", "sent")),
                       CommandRecord.expires_at > now,
                       sa.or_(col(CommandRecord.sent_at).is_(None),
                              col(CommandRecord.sent_at) <= cutoff))
                .limit(TICK_BATCH))).all()
        for command_id in due:
            await self._deliver(command_id)
        return expired, len(due)

    async def redeliver_sites(self, site_ids: Sequence[int]) -> None:
        """Agents came (back) online: send them what they have not answered yet.

        One query for all of them: after a broker restart a thousand agents say `online`
        within seconds, and ingest waits for this between its transactions.
        """
        if not site_ids:
            return
        now = self.clock.now()
        async with self.db.session() as session:
            due = (await session.exec(
                select(CommandRecord.id)
                .where(col(CommandRecord.site_id).in_(site_ids),
                       col(CommandRecord.state).in_(("pending", "sent")),
                       CommandRecord.expires_at > now))).all()
        for command_id in due:
            self._spawn(self._deliver(command_id))

    async def close(self) -> None:
        """Finish deliveries under way and disconnect."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._publisher is not None:
            await self._publisher.close()
