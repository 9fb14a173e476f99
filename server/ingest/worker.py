"""The ingest worker: `emu/v1/+/telemetry|events|status` from the broker into the database.

    paho thread --on_message--> raw queue --decode task--> parsed queue --writer task--> DB
         ^                                                                       |
         +------------------------ PUBACK after the commit ---------------------+

paho runs its network loop in its own thread and hands each message to the event loop
(`call_soon_threadsafe`). A decoder task validates it against the schemas and resolves its
site; a writer task takes whatever has accumulated (up to `GROUP_POINTS` readings) and stores
it in one transaction, so that decoding the next messages overlaps the database's work.

At-least-once: the client runs with `manual_ack`, and a message is acknowledged only once its
transaction has committed (or once it was found invalid, which no retry can fix); `stop()`
drains what was received before it disconnects. If the process dies first, the broker delivers
the unacknowledged messages again when a worker reconnects with the same client id: set
`mqtt.client_id` (one per process) for a persistent session (kept `SESSION_EXPIRY_S` while
away). Without it the session ends with the connection, and what was in flight when the
process died is lost. Either way the store's (agent, seq) claim drops what was already
stored. At most `queue_limit` messages are unacknowledged at once: past that, paho's thread
waits, which stops reading the socket (backpressure) instead of growing memory.

Shared subscription (`$share/<group>/...`) when `mqtt.shared_group` is set and the broker
offers it (MQTT 5 CONNACK: Shared Subscription Available). With `protocol = "auto"` a bare
MQTT 5 CONNECT probes the broker first; one that refuses it (amqtt) gets MQTT 3.1.1, and the
worker subscribes without sharing.

The fault engine's hooks run after the group is stored, in the same transaction, inside one
savepoint: if a call raises, that savepoint is rolled back and the group's calls run again one
by one, each in its own savepoint, so a broken rule loses neither readings nor the other
units' fault state (a hook may thus see the same readings twice; its database effects from
the first try were rolled back).

Reconnects back off exponentially with full jitter, capped. Nothing in here crashes on a bad
message: it is counted in `emu_ingest_batches_total{outcome=...}` and logged with its topic
and agent id (the same complaint at most once a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.clock import Clock, SystemClock
from protocols.errors import MessageError, TopicError
from protocols.messages import (
    AgentState,
    CommandAck,
    Event,
    EventBatch,
    Status,
    TelemetryBatch,
    TelemetryPoint,
    parse_payload,
)
from protocols.topics import (
    SHARE_PREFIX,
    TopicKind,
    parse_topic,
    subscription,
    topic,
    validate_site,
)
from server.core.config import ServerSettings
from server.core.db import Database
from server.errors import IngestError
from server.metrics import INGEST_BATCHES, INGEST_LAG, INGEST_POINTS
from server.models import Site, Unit
from server.storage import (
    Conflicts,
    ReadingsClash,
    StoredEvents,
    StoredTelemetry,
    TelemetryStore,
)

log = logging.getLogger(__name__)

KINDS = (TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.STATUS, TopicKind.CMD_ACK)
QUEUE_LIMIT = 1000
"""Most messages received and not yet acknowledged; past that, paho's thread waits."""
GROUP_POINTS = 20_000
"""Readings stored per transaction at most (a group closes early when the queue is empty)."""
GROUP_MESSAGES = 200
PARSED_AHEAD = 40
"""Decoded messages waiting for the writer, at most."""
GC_THRESHOLD = 50_000
"""Allocations between young-generation collections while ingest runs (Python's default
700 makes the collector walk the batches in flight hundreds of times a second)."""
GC_THAW_S = 3600.0
"""How long objects that survived a full collection stay out of the collector's walks."""
GC_PAUSE_LOG_S = 0.5
"""A collection that held the process longer than this is logged (it delays every batch)."""
CONNECT_TIMEOUT_S = 10.0
SUBSCRIBE_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 30.0
KEEPALIVE_S = 30
SESSION_EXPIRY_S = 3600
"""How long the broker keeps a named worker's session (and its messages) while it is away."""
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0
LOG_EVERY_S = 60.0
"""The same complaint (topic, site or agent) is logged at most this often."""

TelemetryHook = Callable[[AsyncSession, Site, Unit, Sequence[TelemetryPoint]], Awaitable[None]]
EventHook = Callable[[AsyncSession, Site, Unit | None, Event], Awaitable[None]]
AckHook = Callable[[AsyncSession, Site, CommandAck], Awaitable[object]]
OnlineHook = Callable[[Sequence[int]], Awaitable[None]]
"""Sites whose agent said `online` in one stored group (called once per group)."""


class _Transient(Exception):
    """The database could not be reached: keep the messages and try again."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message as paho delivered it, tagged with the connection that must acknowledge it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


@dataclass(slots=True)
class Parsed:
    """A valid message for a known site."""

    incoming: Incoming
    site: Site
    kind: TopicKind
    message: TelemetryBatch | EventBatch | Status | CommandAck

    @property
    def size(self) -> int:
        """Rows it will write, roughly (for sizing groups)."""
        msg = self.message
        if isinstance(msg, TelemetryBatch):
            return len(msg.points)
        return len(msg.events) if isinstance(msg, EventBatch) else 1


@dataclass
class IngestStats:
    """Counters and state for `/metrics` and health."""

    received: int = 0
    stored: int = 0
    points: int = 0
    duplicates: int = 0
    invalid: int = 0
    unknown_site: int = 0
    refused: int = 0
    errors: int = 0
    hook_errors: int = 0
    retries: int = 0
    reconnects: int = 0
    groups: int = 0
    peak_inflight: int = 0
    connected: bool = False
    protocol: str | None = None
    shared: bool = False
    last_error: str | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Backoff:
    """Capped exponential backoff with full jitter."""

    base: float = BACKOFF_BASE_S
    cap: float = BACKOFF_CAP_S
    attempts: int = 0

    def next_delay(self) -> float:
        self.attempts += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** min(self.attempts, 16)))  # noqa: S311

    def reset(self) -> None:
        self.attempts = 0


class _Throttled:
    """Warnings at most once per key per `LOG_EVERY_S`, with a count of those held back.

    A misconfigured agent publishing every second must not drown the log (or the disk).
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._next: dict[tuple[str, ...], tuple[float, int]] = {}

    def warning(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        now = time.monotonic()
        due, held = self._next.get(key, (0.0, 0))
        if now < due:
            self._next[key] = (due, held + 1)
            return
        if len(self._next) > 10_000:  # bound the memory under a flood of distinct keys
            self._next.clear()
        self._next[key] = (now + LOG_EVERY_S, 0)
        if held:
            msg += f" ({held} more like this in the last {LOG_EVERY_S:g} s)"
        self.logger.warning(msg, *args)


class _GcTuning:
    """Keep the collector from pausing ingest, while any worker of the process runs.

    Young generation: its threshold is raised (`GC_THRESHOLD`). Full collections: a server
    with a fleet in memory (the fault engine's state of every unit, the caches) holds millions
    of objects, and each full collection walks all of them: ~1 s with 10,000 units, every
    minute or two, because batches in flight keep being promoted to the old generation. That
    pause was most of the fleet test's p99. So whatever survives a full collection is frozen
    (`gc.freeze`: left out of later walks), and later full collections only walk what came
    since. Once every `GC_THAW_S` the frozen objects are thawed, so that the next full
    collection finds whatever died among them in a reference cycle: one pause an hour.
    """

    users = 0
    saved: tuple[int, int, int] = (700, 10, 10)
    freeze_due = False
    thaw_at = 0.0
    started = 0.0
    long_pause: tuple[int, float] | None = None

    @classmethod
    def enter(cls) -> None:
        if cls.users == 0:
            cls.saved = gc.get_threshold()
            gc.set_threshold(max(cls.saved[0], GC_THRESHOLD), *cls.saved[1:])
            gc.callbacks.append(cls._collected)
            cls.thaw_at = time.monotonic() + GC_THAW_S
        cls.users += 1

    @classmethod
    def leave(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            gc.set_threshold(*cls.saved)
            gc.callbacks.remove(cls._collected)
            gc.unfreeze()
            cls.freeze_due = False

    @staticmethod
    def _collected(phase: str, info: dict[str, int]) -> None:
        # Only notes: freezing and logging wait for `tend`, outside the collection.
        if phase == "start":
            _GcTuning.started = time.perf_counter()
            return
        took = time.perf_counter() - _GcTuning.started
        if took > GC_PAUSE_LOG_S:
            _GcTuning.long_pause = (info["generation"], took)
        if info["generation"] == 2:
            _GcTuning.freeze_due = True

    @classmethod
    def tend(cls) -> None:
        """Between messages: freeze after a full collection, thaw when it is time."""
        if cls.users == 0:
            return
        if cls.long_pause is not None:
            generation, took = cls.long_pause
            cls.long_pause = None
            log.warning("ingest: a garbage collection (generation %d) held the process %.2f s",
                        generation, took)
        if cls.freeze_due:
            cls.freeze_due = False
            gc.freeze()
        elif time.monotonic() >= cls.thaw_at:
            cls.thaw_at = time.monotonic() + GC_THAW_S
            gc.unfreeze()


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _agent_of(payload: bytes) -> str:
    """Best-effort agent id of a payload that failed validation (for the log line)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "?"
    agent = obj.get("agent") if isinstance(obj, dict) else None
    return agent[:64] if isinstance(agent, str) else "?"


def _transient(exc: BaseException) -> bool:
    """A lost or busy database (retry), as opposed to a batch it refuses (drop)."""
    if isinstance(exc, OSError | TimeoutError | sa.exc.OperationalError | sa.exc.InterfaceError):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    sqlstate = getattr(exc, "sqlstate", None)  # psycopg's own errors (from COPY)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in ("08", "40", "53", "57")
    return type(exc).__module__.startswith("psycopg") and type(exc).__name__ in (
        "OperationalError", "InterfaceError")


class IngestWorker:
    """Subscribes, validates, stores and acknowledges, until `stop()`."""

    def __init__(
        self,
        settings: ServerSettings,
        db: Database,
        on_telemetry: TelemetryHook | None = None,
        on_event: EventHook | None = None,
        *,
        on_ack: AckHook | None = None,
        on_online: OnlineHook | None = None,
        store: TelemetryStore | None = None,
        clock: Clock | None = None,
        queue_limit: int = QUEUE_LIMIT,
        group_points: int = GROUP_POINTS,
        site: str | None = None,
        tune_gc: bool = True,
    ) -> None:
        self.settings = settings
        self.mqtt = settings.mqtt
        self.db = db
        self.on_telemetry = on_telemetry
        self.on_event = on_event
        self.on_ack = on_ack
        """Answers to commands (`cmd/ack`), applied in the transaction that stores the group."""
        self.on_online = on_online
        """Called with the site ids whose agent said `online`, once the group is committed."""
        self.clock = clock or SystemClock()
        self.store = store or TelemetryStore(clock=self.clock)
        self.registry = self.store.registry
        self.queue_limit = queue_limit
        self.group_points = group_points
        self.site = None if site is None else validate_site(site)
        """Only this site's topics (a worker dedicated to one big site; tests), else all."""
        self._log = _Throttled(log)
        self.tune_gc = tune_gc
        """Raise the collector's young-generation threshold while running (`GC_THRESHOLD`)."""
        self.stats = IngestStats()
        self.ready = asyncio.Event()
        """Set while connected and subscribed."""
        self._raw: asyncio.Queue[Incoming] = asyncio.Queue()
        # Decoded batches are bulky (a Python object per reading): decode only a little ahead
        # of the writer, the rest waits as payload bytes.
        self._parsed: asyncio.Queue[Parsed] = asyncio.Queue(PARSED_AHEAD)
        self._room = threading.BoundedSemaphore(queue_limit)
        self._closing = threading.Event()
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._done = asyncio.Event()
        self._running = False
        self._inflight = 0
        self._generation = 0
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = _Backoff()
        self._v5: bool | None = {"5": True, "3.1.1": False}.get(self.mqtt.protocol)
        persistent = self.mqtt.client_id is not None
        self.client_id = self.mqtt.client_id or (
            f"emu-ingest-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.persistent = persistent

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet acknowledged or dropped."""
        return self._inflight

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, subscribe, ingest, reconnect; until `stop()` (then drain and return)."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        if self.tune_gc:
            _GcTuning.enter()
        tasks = [asyncio.create_task(self._decode_loop(), name="ingest-decode"),
                 asyncio.create_task(self._write_loop(), name="ingest-write")]
        try:
            await self._connection_loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.tune_gc:
                _GcTuning.leave()
            self._running = False
            self._done.set()

    async def stop(self) -> None:
        """Stop taking messages, store and acknowledge what was taken, disconnect."""
        self._closing.set()
        self._stopping.set()
        if self._running:
            await self._done.wait()

    # -- MQTT -----------------------------------------------------------------------------
    async def _connection_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._v5 is None:
                    self._v5 = await self._probe_v5()
                proto = MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311
                await self._session(proto)
            except IngestError as exc:
                self.stats.last_error = str(exc)
                log.error("ingest: %s", exc)
            except Exception as exc:  # never let the loop die on a paho or socket surprise
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("ingest: connection to %s failed: %s", self.mqtt.url,
                            self.stats.last_error)
            finally:
                self.stats.connected = False
                self.ready.clear()
            if self._stopping.is_set():
                break
            self.stats.reconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._backoff.next_delay())

    async def _probe_v5(self) -> bool:
        """Does the broker speak MQTT 5? A bare CONNECT (no properties) under another id.

        A 3.1.1-only broker answers it with "unsupported protocol version" (amqtt hangs on a
        v5 CONNECT that carries properties, such as the session expiry a named worker sends).
        """
        loop = asyncio.get_running_loop()
        client = self._make_client(MQTTProtocolVersion.MQTTv5, f"{self.client_id}-probe"[:64])
        connack: asyncio.Future[ReasonCode] = loop.create_future()
        gone = asyncio.Event()

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            loop.call_soon_threadsafe(_settle, connack, reason)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(gone.set)

        def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
            loop.call_soon_threadsafe(gone.set)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_connect_fail = on_connect_fail
        try:
            client.connect_async(self.mqtt.host, self.mqtt.port, KEEPALIVE_S)
            client.loop_start()
            try:
                reason: ReasonCode = await self._first(connack, gone, CONNECT_TIMEOUT_S,
                                                       "CONNACK")
            except ConnectionError:
                return False  # closed on a v5 CONNECT
            if reason.is_failure and reason.value in (0x86, 0x87, 4, 5):
                raise IngestError(f"{self.mqtt.url} refused the ingest worker: {reason}")
            supported = not reason.is_failure or reason.value not in (0x84, 1)
            log.info("ingest: %s %s MQTT 5", self.mqtt.url,
                     "speaks" if supported else "does not speak")
            return supported
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    def _make_client(self, proto: MQTTProtocolVersion, client_id: str | None = None
                     ) -> mqtt.Client:
        v5 = proto == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or self.client_id, protocol=proto,
            clean_session=None if v5 else not self.persistent, manual_ack=True,
            reconnect_on_failure=False,
        )
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self.mqtt.password)
        if self.mqtt.url.startswith("mqtts://"):
            try:
                m = self.mqtt
                client.tls_set(ca_certs=str(m.ca_file) if m.ca_file else None,
                               certfile=str(m.cert_file) if m.cert_file else None,
                               keyfile=str(m.key_file) if m.key_file else None,
                               tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError) as exc:
                raise IngestError(f"mqtt TLS files unusable: {exc}") from exc
        return client

    async def _session(self, proto: MQTTProtocolVersion) -> None:
        """One connection, from CONNECT to its loss (or to `stop()` and the drain)."""
        loop = asyncio.get_running_loop()
        v5 = proto == MQTTProtocolVersion.MQTTv5
        client = self._make_client(proto)
        self._generation += 1
        generation = self._generation
        connack: asyncio.Future[tuple[ReasonCode, Properties | None]] = loop.create_future()
        suback: asyncio.Future[list[ReasonCode]] = loop.create_future()
        gone = asyncio.Event()

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                       props: Properties | None) -> None:
            loop.call_soon_threadsafe(_settle, connack, (reason, props))

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode],
                         _p: Any) -> None:
            loop.call_soon_threadsafe(_settle, suback, codes)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(gone.set)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self._on_message(loop, msg, generation)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect

        def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
            loop.call_soon_threadsafe(gone.set)

        client.on_connect_fail = on_connect_fail
        client.on_message = on_message
        props: Properties | None = None
        if v5 and self.persistent:  # (no Receive Maximum: the semaphore bounds the window)
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            client.connect_async(
                self.mqtt.host, self.mqtt.port, KEEPALIVE_S,
                clean_start=not self.persistent if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
            client.loop_start()
            self._client = client
            reason, cprops = await self._first(connack, gone, CONNECT_TIMEOUT_S, "CONNACK")
            if reason.is_failure:
                if reason.value in (0x86, 0x87, 4, 5):  # bad user name or password, not authorised
                    raise IngestError(f"{self.mqtt.url} refused the ingest worker: {reason}")
                raise ConnectionError(f"{self.mqtt.url} refused the connection: {reason}")
            group = self.mqtt.shared_group or None
            shared = bool(v5 and group and getattr(cprops, "SharedSubscriptionAvailable", 1))
            if group and not shared:
                log.warning("ingest: %s offers no shared subscriptions; every worker on this "
                            "broker receives every message (stored once all the same)",
                            self.mqtt.url)
            filters = [self._filter(k, group if shared else None) for k in KINDS]
            client.subscribe([(f, 1) for f in filters])
            codes = await self._first(suback, gone, SUBSCRIBE_TIMEOUT_S, "SUBACK")
            refused = [f for f, c in zip(filters, codes, strict=False) if c.is_failure]
            if refused:
                raise IngestError(f"{self.mqtt.url} refused the subscriptions {refused}: {codes}")
            self.stats.connected = True
            self.stats.protocol = "5" if v5 else "3.1.1"
            self.stats.shared = shared
            self._backoff.reset()
            self.ready.set()
            log.info("ingest: subscribed to %s on %s (MQTT %s)", ", ".join(filters),
                     self.mqtt.url, self.stats.protocol)
            stopping = asyncio.create_task(self._stopping.wait())
            lost = asyncio.create_task(gone.wait())
            try:
                await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                lost.cancel()
            if self._stopping.is_set() and not gone.is_set():
                await self._drain()
            elif not self._stopping.is_set():
                log.warning("ingest: lost the connection to %s", self.mqtt.url)
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    def _filter(self, kind: TopicKind, group: str | None) -> str:
        if self.site is None:
            return subscription(kind, group)
        exact = topic(self.site, kind)
        return exact if group is None else f"{SHARE_PREFIX}{group}/{exact}"

    async def _first(self, fut: asyncio.Future[Any], gone: asyncio.Event, limit_s: float,
                     what: str) -> Any:
        """The future's result, unless the connection goes or `limit_s` passes first."""
        lost = asyncio.create_task(gone.wait())
        try:
            done, _ = await asyncio.wait({fut, lost}, timeout=limit_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if fut in done:
            return fut.result()
        if lost in done:
            raise ConnectionError(f"{self.mqtt.url} closed the connection before {what}")
        raise TimeoutError(f"no {what} from {self.mqtt.url} in {limit_s:g} s")

    def _on_message(self, loop: asyncio.AbstractEventLoop, msg: mqtt.MQTTMessage,
                    generation: int) -> None:
        """paho's thread: wait for room (backpressure), then hand over to the event loop."""
        try:
            while not self._room.acquire(timeout=0.5):
                if self._closing.is_set():
                    return
            if self._closing.is_set():  # not acknowledged: the broker delivers it again
                self._room.release()
                return
            try:
                name = msg.topic
            except UnicodeDecodeError:  # parse_topic refuses it, and the message is counted
                name = "(a topic that is not UTF-8)"
            item = Incoming(name, bytes(msg.payload), msg.mid, msg.qos, generation)
            loop.call_soon_threadsafe(self._accept, item)
        except RuntimeError:  # the event loop is closed: we are shutting down
            return

    def _accept(self, item: Incoming) -> None:
        self._inflight += 1
        self.stats.peak_inflight = max(self.stats.peak_inflight, self._inflight)
        self._idle.clear()
        self.stats.received += 1
        self._raw.put_nowait(item)

    def _finish(self, item: Incoming, ack: bool) -> None:
        """Acknowledge (if handled) and free its place in the window."""
        client = self._client
        if ack and item.qos > 0 and client is not None and item.generation == self._generation:
            client.ack(item.mid, item.qos)
        self._room.release()
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("ingest: %d messages not stored within %g s of stop; the broker "
                        "delivers them again", self._inflight, DRAIN_TIMEOUT_S)

    # -- decoding -------------------------------------------------------------------------
    def _count(self, stream: str, outcome: str, n: int = 1) -> None:
        INGEST_BATCHES.labels(stream=stream, outcome=outcome).inc(n)
        key = f"{stream}:{outcome}"
        self.stats.outcomes[key] = self.stats.outcomes.get(key, 0) + n

    async def _decode_loop(self) -> None:
        while True:
            item = await self._raw.get()
            if self.tune_gc:
                _GcTuning.tend()
            try:
                parsed = await self._decode(item)
            except Exception as exc:
                if _transient(exc):  # the site lookup could not reach the database
                    await self._retry_decode(item)
                    continue
                log.exception("ingest: cannot handle %s", item.topic)
                self.stats.errors += 1
                self._finish(item, ack=True)
                continue
            if parsed is None:
                self._finish(item, ack=True)
            else:
                await self._parsed.put(parsed)

    async def _lookup(self, code: str, agent: str) -> tuple[Site | None, int | None]:
        """The topic's site and the site the agent is registered to (cache, else a query)."""
        hit, site = self.registry.peek_site(code)
        if hit and (site is None or self.registry.peek_agent(agent)[0]):
            return site, self.registry.peek_agent(agent)[1]
        async with self.db.session() as session:
            site = await self.registry.site(session, code)
            owner = None if site is None else await self.registry.agent_site(session, agent)
        return site, owner

    async def _retry_decode(self, item: Incoming) -> None:
        backoff = _Backoff()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.next_delay())
            if self._stopping.is_set():  # not acknowledged: the broker delivers it again
                self._finish(item, ack=False)
                return
            try:
                parsed = await self._decode(item)
            except Exception as exc:
                if _transient(exc):
                    continue
                log.exception("ingest: cannot handle %s", item.topic)
                self._finish(item, ack=True)
                return
            if parsed is None:
                self._finish(item, ack=True)
            else:
                await self._parsed.put(parsed)
            return

    async def _decode(self, item: Incoming) -> Parsed | None:
        """Validate topic and payload and find the site; None (counted, logged) if unusable."""
        try:
            code, kind = parse_topic(item.topic)
        except TopicError as exc:
            self.stats.invalid += 1
            self._count("unknown", "invalid")
            self._log.warning(("topic", item.topic), "ingest: ignored a message: %s", exc)
            return None
        stream = kind.value
        if self.site is not None and code != self.site:  # not subscribed to: a broker's slip
            log.debug("ingest: ignored a message on %s (this worker takes %s only)",
                      item.topic, self.site)
            return None
        if kind not in KINDS:
            self.stats.invalid += 1
            self._count(stream, "invalid")
            self._log.warning(("topic", item.topic),
                              "ingest: ignored a message on %s: not an ingest topic", item.topic)
            return None
        if kind is TopicKind.STATUS and not item.payload:
            return None  # a retained status being deleted
        hit, known = self.registry.peek_site(code)
        if hit and known is None:  # a site we know we do not serve: skip the parse
            self.stats.unknown_site += 1
            self._count(stream, "unknown_site")
            return None
        try:
            message = parse_payload(kind, item.payload)
        except MessageError as exc:
            self.stats.invalid += 1
            self._count(stream, "invalid")
            agent = _agent_of(item.payload)
            self._log.warning(("invalid", item.topic, agent),
                              "ingest: invalid %s from agent %s on %s: %s", stream, agent,
                              item.topic, exc)
            return None
        assert isinstance(message, TelemetryBatch | EventBatch | Status | CommandAck)  # noqa: S101
        site, owner = await self._lookup(code, message.agent)
        if site is None:
            self.stats.unknown_site += 1
            self._count(stream, "unknown_site")
            self._log.warning(("site", code), "ingest: %s from agent %s for unknown site %r (%s)",
                              stream, message.agent, code, item.topic)
            return None
        if owner is not None and owner != site.id:
            self.stats.refused += 1
            self._count(stream, "wrong_site")
            self._log.warning(("owner", code, message.agent),
                              "ingest: agent %s is registered to another site than %r; refused "
                              "%s (%s)", message.agent, code, stream, item.topic)
            return None
        return Parsed(item, site, kind, message)

    # -- writing --------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            group = [await self._parsed.get()]
            size = group[0].size
            while (not self._parsed.empty() and size < self.group_points
                   and len(group) < GROUP_MESSAGES):
                item = self._parsed.get_nowait()
                group.append(item)
                size += item.size
            await self._write(group)

    async def _write(self, group: list[Parsed]) -> None:
        """Store a group in one transaction; isolate a poisonous message if that fails."""
        try:
            outcomes = await self._with_retry(group)
        except _Transient:
            for p in group:  # stopping while the database is away: leave them to the broker
                self._finish(p.incoming, ack=False)
            return
        except Exception as exc:
            if len(group) == 1:
                self._failed(group[0], exc)
                return
            log.warning("ingest: a group of %d messages failed (%s); storing them one by one",
                        len(group), exc)
            for p in group:
                await self._write([p])
            return
        self.stats.groups += 1
        for p, (outcome, rows, newest) in zip(group, outcomes, strict=True):
            self._record(p, outcome, rows, newest)
            self._finish(p.incoming, ack=True)

    def _failed(self, p: Parsed, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self._count(p.kind.value, "error")
        log.error("ingest: dropped %s %s from agent %s (%s): %s", p.kind.value,
                  getattr(p.message, "seq", ""), p.message.agent, p.incoming.topic,
                  self.stats.last_error)
        self._finish(p.incoming, ack=True)

    def _record(self, p: Parsed, outcome: str, rows: int, newest: datetime | None) -> None:
        self._count(p.kind.value, outcome)
        if outcome == "duplicate":
            self.stats.duplicates += 1
        elif outcome == "wrong_site":
            self.stats.refused += 1
        else:
            self.stats.stored += 1
        if rows:
            self.stats.points += rows
            INGEST_POINTS.inc(rows)
        if newest is not None:
            INGEST_LAG.observe(max(0.0, (self.clock.now() - newest).total_seconds()))

    async def _with_retry(self, group: list[Parsed]) -> list[tuple[str, int, datetime | None]]:
        backoff = _Backoff()
        deadline: float | None = None
        conflicts: Conflicts = "raise"
        while True:
            try:
                return await self._store(group, conflicts)
            except ReadingsClash:
                conflicts = "ignore"  # a reading was stored before: go again, skipping it
                continue
            except Exception as exc:
                if not _transient(exc):
                    raise
                self.stats.retries += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("ingest: database unavailable (%s); retrying", exc)
            if self._stopping.is_set():
                now = time.monotonic()
                deadline = deadline or now + DRAIN_TIMEOUT_S
                if now >= deadline:
                    raise _Transient
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.next_delay())

    async def _store(
        self, group: list[Parsed], conflicts: Conflicts = "raise"
    ) -> list[tuple[str, int, datetime | None]]:
        """One transaction: telemetry of the group, then events and status, then the hooks."""
        outcomes: list[tuple[str, int, datetime | None]] = [("stored", 0, None)] * len(group)
        stored: list[StoredTelemetry | StoredEvents | None] = [None] * len(group)
        online: list[int] = []
        async with self.db.session() as session:
            where: list[int] = []
            batches: list[tuple[Site, TelemetryBatch]] = []
            for i, p in enumerate(group):
                if isinstance(p.message, TelemetryBatch):
                    where.append(i)
                    batches.append((p.site, p.message))
            results = await self.store.store_telemetry_many(session, batches, conflicts)
            for i, res in zip(where, results, strict=True):
                stored[i] = res
                if res is None:
                    outcomes[i] = ("duplicate", 0, None)
                else:
                    newest = max((u.newest for u in res.units if u.newest), default=None)
                    outcomes[i] = ("stored", res.rows, newest)
            for i, p in enumerate(group):
                msg = p.message
                if isinstance(msg, EventBatch):
                    ev = await self.store.store_events(session, p.site, msg)
                    stored[i] = ev
                    outcomes[i] = ("duplicate" if ev is None else "stored", 0, None)
                elif isinstance(msg, Status):
                    try:
                        await self.store.apply_status(session, p.site, msg)
                    except IngestError as exc:
                        log.warning("ingest: status on %s refused: %s", p.incoming.topic, exc)
                        outcomes[i] = ("wrong_site", 0, None)
                    else:
                        if msg.state is AgentState.ONLINE and p.site.id is not None:
                            online.append(p.site.id)
                elif isinstance(msg, CommandAck):
                    if self.on_ack is None:
                        outcomes[i] = ("ignored", 0, None)
                    else:
                        outcomes[i] = await self._apply_ack(session, p, msg)
            if self.on_telemetry is not None or self.on_event is not None:
                await self._hooks(session, group, stored)
        if self.on_online is not None and online:
            await self.on_online(list(dict.fromkeys(online)))
        return outcomes

    async def _apply_ack(self, session: AsyncSession, p: Parsed,
                         ack: CommandAck) -> tuple[str, int, datetime | None]:
        """An answer to a command, in its own savepoint: a failing callback loses nothing else."""
        assert self.on_ack is not None  # noqa: S101  (checked by the caller)
        try:
            async with session.begin_nested():
                await self.on_ack(session, p.site, ack)
        except Exception as exc:
            if _transient(exc):
                raise
            self.stats.hook_errors += 1
            log.exception("ingest: the answer to command %s from %s could not be applied",
                          ack.command_id, p.site.code)
            return ("error", 0, None)
        return ("stored", 0, None)

    async def _hooks(self, session: AsyncSession, group: list[Parsed],
                     stored: Sequence[StoredTelemetry | StoredEvents | None]) -> None:
        """Call the fault engine in arrival order; a failing hook never loses the readings."""
        calls: list[tuple[Callable[..., Awaitable[None]], Site, int | None, Any]] = []
        for p, res in zip(group, stored, strict=True):
            if isinstance(res, StoredTelemetry) and self.on_telemetry is not None:
                calls.extend((self.on_telemetry, p.site, u.unit.id, u.points) for u in res.units)
            elif isinstance(res, StoredEvents) and self.on_event is not None:
                calls.extend((self.on_event, p.site, None if u is None else u.id, ev)
                             for u, ev in res.events)
        if not calls:
            return
        ids = {c[2] for c in calls if c[2] is not None}
        units = await self.registry.unit_rows(session, ids)
        try:
            async with session.begin_nested():
                for hook, site, unit_id, arg in calls:
                    await hook(session, site, None if unit_id is None else units[unit_id], arg)
            return
        except Exception as exc:
            if _transient(exc):
                raise
            log.warning("ingest: a fault-engine hook failed (%s); calling them one by one", exc)
        stale = True  # a rolled-back savepoint expires the units: reload before each use
        for hook, site, unit_id, arg in calls:
            try:
                if stale:
                    units = await self.registry.unit_rows(session, ids, refresh=True)
                    stale = False
                async with session.begin_nested():
                    await hook(session, site, None if unit_id is None else units[unit_id], arg)
            except Exception as exc:
                if _transient(exc):
                    raise
                stale = True
                self.stats.hook_errors += 1
                log.exception("ingest: %s failed for site %s unit %s",
                              getattr(hook, "__name__", "hook"), site.code, unit_id)

