"""The uplink: spooled batches to the central broker, QoS 1, deleted only once acknowledged.

The only module that talks to the central broker. Each connection is a fresh paho client, so
nothing survives a disconnect inside paho: after a reconnect the uplink replays the spool from
its oldest batch, in order (at-least-once; the server drops duplicates by `agent`, `seq`).
Birth and death: `online` is published retained on `status` after every connect, and a
retained `offline` is the last will. Reconnects back off exponentially with full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.config import AgentSettings
from agent.coordinator import Backoff
from agent.errors import UplinkError
from agent.spool import Spool
from protocols.clock import Clock, SystemClock
from protocols.messages import AgentState, Health, Status
from protocols.topics import TopicKind, topic

log = logging.getLogger(__name__)


class _Lost(Exception):
    """The connection went away; reconnect."""


@dataclass
class UplinkStats:
    """Counters for health."""

    published: int = 0
    acked: int = 0
    reconnects: int = 0
    connected: bool = False
    last_error: str | None = None


class Uplink:
    """Publishes the spool to the central broker for as long as it runs."""

    def __init__(self, settings: AgentSettings, spool: Spool, clock: Clock | None = None) -> None:
        self.settings = settings
        self.broker = settings.broker
        self.spool = spool
        self.clock = clock or SystemClock()
        self.stats = UplinkStats()
        self.backoff = Backoff(base=0.5, cap=self.broker.backoff_max_s)
        self._wake = asyncio.Event()
        self._protocols = (
            [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311]
            if self.broker.protocol == "auto"
            else [
                MQTTProtocolVersion.MQTTv5
                if self.broker.protocol == "5"
                else MQTTProtocolVersion.MQTTv311
            ]
        )
        self._client: mqtt.Client | None = None
        self.health: Health | None = None
        self.topics = {
            "telemetry": topic(settings.site, TopicKind.TELEMETRY),
            "events": topic(settings.site, TopicKind.EVENTS),
            "ack": topic(settings.site, TopicKind.CMD_ACK),
        }
        self.cmd_topic = topic(settings.site, TopicKind.CMD)
        self.on_command: Callable[[bytes], None] | None = None
        """Called on the event loop with each payload that arrives on `cmd`."""
        self.status_topic = topic(settings.site, TopicKind.STATUS)

    def notify(self) -> None:
        """Something new is in the spool."""
        self._wake.set()

    def _status(self, state: AgentState) -> bytes:
        return Status(state=state, agent=self.settings.agent, version=__version__,
                      ts=self.clock.now(), health=self.health).to_bytes()

    async def run(self) -> None:
        """Connect, publish, reconnect; forever."""
        attempt = 0
        while True:
            proto = self._protocols[attempt % len(self._protocols)]
            try:
                await self._session(proto)
            except _Lost as exc:
                self.stats.last_error = str(exc)
                log.warning("uplink: %s", exc)
            except UplinkError as exc:
                self.stats.last_error = str(exc)
                log.error("uplink: %s", exc)
            finally:
                self.stats.connected = False
            if len(self._protocols) > 1 and not self.stats.published:
                attempt += 1  # try the other MQTT version until one works
            self.stats.reconnects += 1
            await asyncio.sleep(self.backoff.next_delay())

    def _make_client(self, proto: MQTTProtocolVersion) -> mqtt.Client:
        b = self.broker
        client_id = b.client_id or f"emu-agent-{self.settings.agent}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
        if b.username:
            client.username_pw_set(b.username, b.password)
        if b.tls:
            try:
                client.tls_set(
                    ca_certs=str(b.ca_file) if b.ca_file else None,
                    certfile=str(b.cert_file) if b.cert_file else None,
                    keyfile=str(b.key_file) if b.key_file else None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (ssl.SSLError, OSError) as exc:
                raise UplinkError(f"TLS files unusable: {exc}") from exc
        client.will_set(self.status_topic, self._status(AgentState.OFFLINE), qos=1, retain=True)
        client.max_inflight_messages_set(self.settings.uplink.max_inflight)
        return client

    async def _session(self, proto: MQTTProtocolVersion) -> None:
        loop = asyncio.get_running_loop()
        client = self._make_client(proto)
        connected: asyncio.Future[ReasonCode] = loop.create_future()
        gone = asyncio.Event()
        acks: deque[int] = deque()

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            def settle() -> None:
                if not connected.done():
                    connected.set_result(reason)

            loop.call_soon_threadsafe(settle)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(gone.set)

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(self._acked, acks, mid)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            if self.on_command is not None and msg.topic == self.cmd_topic:
                loop.call_soon_threadsafe(self.on_command, bytes(msg.payload))

        client.on_publish = on_publish
        client.on_message = on_message
        self._client = client
        try:
            client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s)
            client.loop_start()
            try:
                async with asyncio.timeout(self.broker.connect_timeout_s):
                    reason = await asyncio.shield(connected)
            except TimeoutError:
                raise _Lost(f"no CONNACK from {self.broker.url}") from None
            if reason.is_failure:
                if reason.value in (0x86, 0x87, 4, 5):  # bad credentials / not authorised
                    raise UplinkError(f"{self.broker.url} refused the agent: {reason}")
                raise _Lost(f"{self.broker.url} refused the connection: {reason}")
            self.stats.connected = True
            self.backoff.reset()
            log.info("uplink: connected to %s", self.broker.url)
            if self.on_command is not None:
                client.subscribe(self.cmd_topic, qos=1)
            client.publish(self.status_topic, self._status(AgentState.ONLINE), qos=1, retain=True)
            await self._pump(client, gone, acks)
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    def _acked(self, acks: deque[int], mid: int) -> None:
        acks.append(mid)
        self._wake.set()

    async def _pump(self, client: mqtt.Client, gone: asyncio.Event, acks: deque[int]) -> None:
        inflight: dict[int, int] = {}
        last_id = 0
        window = self.settings.uplink.max_inflight
        while not gone.is_set():
            done = [inflight.pop(mid) for mid in list(acks) if mid in inflight]
            acks.clear()
            if done:
                self.stats.acked += len(done)
                await self.spool.delete(done)
            if len(inflight) < window:
                for row in await self.spool.peek(last_id, window - len(inflight)):
                    info = client.publish(self.topics[row.stream], row.payload, qos=1)
                    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        raise _Lost(f"publish failed: {mqtt.error_string(info.rc)}")
                    inflight[info.mid] = row.id
                    last_id = row.id
                    self.stats.published += 1
            self._wake.clear()
            if acks:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):  # not wait_for: it can eat a cancel (3.11)
                    await self._wake.wait()
        raise _Lost("connection closed by the broker or the network")

    def publish_status(self, health: Health) -> None:
        """Publish `online` with fresh health (retained), if connected."""
        self.health = health
        client = self._client
        if client is not None and self.stats.connected:
            client.publish(self.status_topic, self._status(AgentState.ONLINE), qos=1, retain=True)

    async def offline(self) -> None:
        """Say `offline` (retained) before a clean shutdown; the will covers a crash."""
        client = self._client
        if client is not None and self.stats.connected:
            info = client.publish(self.status_topic, self._status(AgentState.OFFLINE), qos=1,
                                  retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.wait_for(asyncio.to_thread(info.wait_for_publish, 2.0), 3.0)
