"""The MQTT collector: MQTT-native units publish JSON to the site broker; samples come out.

A unit publishes `{"serial", "series", "unit", "seq", "ts", "values": {point: value}}` (the
simulator's MQTT mode, docs/simulator.md) on the device's `topic`. `values` are keyed by the
profile's point names in engineering units, so they map through the same profile as a Modbus
unit's registers and get the same qualities (`good`, `out_of_range`) and alarm/state events.
A unit that says nothing for `comm_loss_after x poll_interval_s` (its publish interval) is
`comm_lost` until it speaks again.

paho runs its own network thread; every callback is handed to the event loop with
`call_soon_threadsafe`, so all state lives on the loop. Each connection is a fresh client;
reconnects back off with jitter. Nothing a publisher sends can end the loop: bad payloads are
counted and logged (rate-limited), unknown point names once per name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import DeviceSettings, LocalMqttSettings
from agent.coordinator import Backoff, Sample, Sink, change_events
from protocols.clock import Clock, SystemClock
from protocols.messages import EventKind, Quality, Severity
from protocols.profiles import Profile
from protocols.registers import PointDef, PointType, Value

log = logging.getLogger(__name__)
T = TypeVar("T")

KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
SUBSCRIBE_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
BACKOFF_CAP_S = 30.0
LOG_FIRST = 10  # malformed messages logged in full before ...
LOG_EVERY = 100  # ... only every 100th is
MAX_UNKNOWN_NAMES = 1000  # names remembered for log-once; a flood of garbage stays bounded

_ALARM_TYPES = (PointType.BITFIELD16, PointType.BITFIELD32)
_STATE_TYPES = (PointType.ENUM16, PointType.ENUM32)
_INTEGRAL = (*_ALARM_TYPES, *_STATE_TYPES)
_TEXT = (PointType.STRING, PointType.HEX, PointType.EUI48, PointType.IPV6ADDR)
_NOT_TELEMETRY = (PointType.SUNSSF, PointType.PAD)


class _Malformed(Exception):
    """A message (or one of its values) that cannot become samples."""


class _Lost(Exception):
    """The broker connection failed or went away; reconnect."""


@dataclass
class MqttStats:
    """Counters per MQTT unit, for health and `emu agent status`."""

    messages: int = 0
    accepted: int = 0
    malformed: int = 0
    unknown: int = 0
    errors: int = 0
    points: int = 0
    reconnects: int = 0
    last_error: str | None = None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_ts(raw: object) -> datetime | None:
    """A payload's `ts` (ISO-8601, `Z` or offset, or epoch ms) as aware UTC; None if absent."""
    if raw is None:
        return None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            return datetime.fromtimestamp(raw / 1000, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise _Malformed(f"ts {raw!r} is not a usable epoch in milliseconds") from exc
    if isinstance(raw, str):
        try:
            ts = datetime.fromisoformat(raw)
        except ValueError as exc:
            raise _Malformed(f"ts {raw!r:.40} is not ISO-8601") from exc
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    raise _Malformed(f"ts must be ISO-8601 or epoch milliseconds, not {raw!r:.40}")


def _parse_payload(payload: bytes) -> tuple[datetime | None, dict[str, Any]]:
    """The `ts` and `values` of a unit's message; _Malformed says what is wrong."""
    try:
        doc = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise _Malformed(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _Malformed(f"expected a JSON object, got {type(doc).__name__}")
    values = doc.get("values")
    if not isinstance(values, dict):
        raise _Malformed("no 'values' object")
    return _parse_ts(doc.get("ts")), values


def _coerce(point: PointDef, raw: object) -> Value:
    """A JSON value checked against its point's type (enums and bitfields as int)."""
    if point.type in _TEXT:
        if isinstance(raw, str):
            return raw
    elif isinstance(raw, bool):
        pass
    elif point.type in _INTEGRAL:
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif isinstance(raw, int) or (isinstance(raw, float) and math.isfinite(raw)):
        return raw
    raise _Malformed(f"{point.name}: a {point.type} point cannot be {raw!r:.40}")


def _quality(point: PointDef, value: Value) -> Quality:
    """`out_of_range` outside the profile's valid range, else `good`."""
    if isinstance(value, int | float) and (
        (point.minimum is not None and value < point.minimum)
        or (point.maximum is not None and value > point.maximum)
    ):
        return Quality.OUT_OF_RANGE
    return Quality.GOOD


class MqttSource:
    """Collects one MQTT-native unit from the site broker, for as long as it runs."""

    def __init__(
        self,
        device: DeviceSettings,
        profile: Profile,
        broker: LocalMqttSettings,
        sink: Sink,
        clock: Clock | None = None,
    ) -> None:
        if not device.topic:
            raise ValueError(f"{device.name}: an MQTT device needs a topic")
        self.device = device
        self.name = device.name
        self.topic = device.topic
        self.profile = profile
        self.broker = broker
        self.sink = sink
        self.clock = clock or SystemClock()
        self.stats = MqttStats()
        self.backoff = Backoff(cap=BACKOFF_CAP_S)
        self.connected = False
        self.comm_lost = False
        self.silence_limit_s = device.comm_loss_after * device.poll_interval_s
        self._points = {
            p.name: p for p in profile.poll_points if p.type not in _NOT_TELEMETRY
        }
        self._known = {p.name for p in profile.points}
        self._last: dict[str, Value] = {}
        self._unknown_names: set[str] = set()
        self._last_heard = self.clock.monotonic()
        url = urlparse(broker.url)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 1883

    def health(self) -> dict[str, Any]:
        """Counters and state as a JSON-able dict."""
        silent = self.clock.monotonic() - self._last_heard
        return {**self.stats.__dict__, "connected": self.connected,
                "comm_lost": self.comm_lost, "silent_s": round(silent, 1)}

    async def run(self) -> None:
        """Connect, subscribe, collect, reconnect; forever (ends only when cancelled)."""
        self._last_heard = self.clock.monotonic()
        watchdog = asyncio.create_task(self._watch(), name=f"mqtt-watch:{self.name}")
        try:
            while True:
                try:
                    await self._session()
                except _Lost as exc:
                    self.stats.last_error = str(exc)
                    log.warning("%s: %s", self.name, exc)
                except Exception as exc:  # a bug must not end collection
                    self.stats.errors += 1
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("%s: unexpected error in the MQTT session", self.name)
                self.stats.reconnects += 1
                await asyncio.sleep(self.backoff.next_delay())
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    # -- connection -----------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"emu-agent-{self.name}-{uuid.uuid4().hex[:8]}",
            reconnect_on_failure=False,
        )
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        return client

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._make_client()
        connected: asyncio.Future[ReasonCode] = loop.create_future()
        subscribed: asyncio.Future[list[ReasonCode]] = loop.create_future()
        gone = asyncio.Event()

        def to_loop(fn: Callable[..., object], *args: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a late callback
                loop.call_soon_threadsafe(fn, *args)

        def settle(fut: asyncio.Future[Any], value: object) -> None:
            if not fut.done():
                fut.set_result(value)

        client.on_connect = lambda _c, _u, _f, rc, _p: to_loop(settle, connected, rc)
        client.on_connect_fail = lambda _c, _u: to_loop(gone.set)
        client.on_subscribe = lambda _c, _u, _m, rcs, _p: to_loop(settle, subscribed, rcs)
        client.on_disconnect = lambda _c, _u, _f, _rc, _p: to_loop(gone.set)
        client.on_message = lambda _c, _u, msg: to_loop(self.on_message, msg.topic, msg.payload)
        where = self.broker.url
        try:
            client.connect_async(self._host, self._port, KEEPALIVE_S)
            client.loop_start()
            reason = await _until(connected, gone, CONNECT_TIMEOUT_S, f"connecting to {where}")
            if reason.is_failure:
                raise _Lost(f"{where} refused the connection: {reason}")
            rc, _mid = client.subscribe(self.topic, qos=1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise _Lost(f"cannot subscribe to {self.topic}: {mqtt.error_string(rc)}")
            codes = await _until(subscribed, gone, SUBSCRIBE_TIMEOUT_S, f"subscribing on {where}")
            if any(code.is_failure for code in codes):
                raise _Lost(f"{where} refused the subscription to {self.topic}: {codes}")
            self.connected = True
            self.backoff.reset()
            log.info("%s: listening on %s at %s", self.name, self.topic, where)
            while not gone.is_set() and client.is_connected():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), KEEPALIVE_S)
            raise _Lost(f"connection to {where} lost")
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                client.disconnect()
            try:
                await asyncio.wait_for(asyncio.to_thread(client.loop_stop), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("%s: paho's network thread did not stop in %g s", self.name,
                            STOP_TIMEOUT_S)

    # -- messages -------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes) -> None:
        """One message from the broker (on the loop); never raises."""
        self.stats.messages += 1
        try:
            self._handle(topic, payload)
        except Exception as exc:  # a bug must not end collection
            self.stats.errors += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: unexpected error handling a message on %s", self.name, topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            ts, values = _parse_payload(payload)
        except _Malformed as exc:
            self._malformed(topic, str(exc))
            return
        ts = ts or self.clock.now()
        samples, bad = self._samples(ts, values)
        if bad:
            self._malformed(topic, "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
        self.stats.accepted += 1
        self._heard()
        if samples:
            self.stats.points += len(samples)
            self.sink.add_samples(self.name, ts, samples)

    def _samples(self, ts: datetime, values: Mapping[str, Any]) -> tuple[list[Sample], list[str]]:
        samples: list[Sample] = []
        bad: list[str] = []
        for name, raw in values.items():
            p = self._points.get(name)
            if p is None:
                if name not in self._known:
                    self._unknown(name)
                continue  # headers, scale factors, pads: known, but not telemetry
            if raw is None:
                continue  # "not implemented" on this unit
            try:
                value = _coerce(p, raw)
            except _Malformed as exc:
                bad.append(str(exc))
                continue
            change_events(self.sink, self.name, ts, p, self._last.get(name), value)
            self._last[name] = value
            samples.append((name, value, _quality(p, value)))
        return samples, bad

    def _unknown(self, name: str) -> None:
        self.stats.unknown += 1
        if name in self._unknown_names or len(self._unknown_names) >= MAX_UNKNOWN_NAMES:
            return
        self._unknown_names.add(name)
        log.warning("%s: point %r is not in profile %s; ignoring it (logged once)",
                    self.name, name[:80], self.profile.series)

    def _malformed(self, topic: str, reason: str) -> None:
        self.stats.malformed += 1
        self.stats.last_error = f"malformed message on {topic}: {reason}"
        n = self.stats.malformed
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            log.warning("%s: malformed message #%d on %s: %s", self.name, n, topic, reason)

    # -- liveness -------------------------------------------------------------------------
    def _heard(self) -> None:
        now = self.clock.monotonic()
        silent, self._last_heard = now - self._last_heard, now
        if self.comm_lost:
            self.comm_lost = False
            self.sink.add_event(self.clock.now(), EventKind.COMM_RESTORED, self.name,
                                "comm_lost", Severity.INFO, {"silent_s": round(silent, 1)})
            log.warning("%s: communication restored", self.name)

    async def _watch(self) -> None:
        tick = min(max(self.silence_limit_s / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(tick)
            try:
                self.check_silence()
            except Exception:  # a bug must not end the watchdog
                self.stats.errors += 1
                log.exception("%s: unexpected error in the silence watchdog", self.name)

    def check_silence(self) -> None:
        """Raise `comm_lost` once the unit has been quiet for longer than its limit."""
        silent = self.clock.monotonic() - self._last_heard
        if self.comm_lost or silent < self.silence_limit_s:
            return
        self.comm_lost = True
        ts = self.clock.now()
        self.sink.add_event(
            ts, EventKind.COMM_LOST, self.name, "comm_lost", Severity.ALARM,
            {"silent_s": round(silent, 1),
             "failed_cycles": int(silent // self.device.poll_interval_s),
             "connected": self.connected, "last_error": self.stats.last_error},
        )
        self.sink.add_samples(self.name, ts, _lost(self._last))
        log.warning("%s: no message for %.1f s: communication lost", self.name, silent)


def _lost(last: Iterable[str]) -> list[Sample]:
    """`comm_lost` samples for the points the unit has published (not the whole profile)."""
    return [(name, None, Quality.COMM_LOST) for name in sorted(last)]


async def _until(
    fut: asyncio.Future[T], gone: asyncio.Event, timeout: float, what: str  # noqa: ASYNC109
) -> T:
    """`fut`'s result, unless the connection drops or `timeout` passes first."""
    dropped = asyncio.ensure_future(gone.wait())
    try:
        done, _ = await asyncio.wait(
            (fut, dropped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        dropped.cancel()
    if fut in done:
        return fut.result()
    raise _Lost(f"{what}: " + ("connection failed" if gone.is_set()
                               else f"no answer in {timeout:g} s"))
