"""A small MQTT publisher for the server's outgoing messages (commands), QoS 1.

Why not the ingest worker's connection: API processes send commands too, and may run without
the ingest role. The connection is made on first use and dropped when it breaks; the next
publish reconnects. A publish that fails raises `PublishError`: the caller keeps the message
in the database and the scheduler sends it again, so nothing depends on this connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from server.core.config import MqttSettings
from server.errors import ServerError

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0


class PublishError(ServerError):
    """The broker could not be reached or did not acknowledge a message."""


class MqttPublisher:
    """Publishes with QoS 1 and waits for the broker's PUBACK."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._client: mqtt.Client | None = None
        self._lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._gone = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Send one message; PublishError if the broker did not take it."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            client = await self._connected()
            info = client.publish(topic, payload, qos=qos)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                await self._drop()
                raise PublishError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            if qos == 0:
                return
            fut = self._pending.setdefault(info.mid, loop.create_future())
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await fut
        except TimeoutError:
            raise PublishError(f"no PUBACK for {topic} within {PUBLISH_TIMEOUT_S:g} s") from None
        finally:
            self._pending.pop(info.mid, None)

    async def _connected(self) -> mqtt.Client:
        if self._client is not None and not self._gone.is_set():
            return self._client
        await self._drop()
        loop = asyncio.get_running_loop()
        s = self.settings
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"emu-cmd-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                             protocol=MQTTProtocolVersion.MQTTv311, reconnect_on_failure=False)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            try:
                client.tls_set(ca_certs=str(s.ca_file) if s.ca_file else None,
                               tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError) as exc:
                raise PublishError(f"mqtt.ca_file unusable: {exc}") from exc
        connected: asyncio.Future[ReasonCode] = loop.create_future()
        gone = asyncio.Event()

        def settle(fut: asyncio.Future[Any], value: Any) -> None:
            if not fut.done():
                fut.set_result(value)

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            loop.call_soon_threadsafe(settle, connected, reason)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(gone.set)

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
            def done() -> None:
                settle(self._pending.setdefault(mid, loop.create_future()), None)

            loop.call_soon_threadsafe(done)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        try:
            client.connect_async(s.host, s.port, 30)
            client.loop_start()
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reason = await connected
        except (TimeoutError, OSError) as exc:
            await self._stop(client)
            raise PublishError(f"cannot reach the broker at {s.url}: {exc or 'timeout'}") from exc
        if reason.is_failure:
            await self._stop(client)
            raise PublishError(f"the broker at {s.url} refused the server: {reason}")
        self._client, self._gone = client, gone
        return client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._stop(client)

    @staticmethod
    async def _stop(client: mqtt.Client) -> None:
        with contextlib.suppress(Exception):
            client.disconnect()
        await asyncio.to_thread(client.loop_stop)

    async def close(self) -> None:
        """Disconnect."""
        async with self._lock:
            await self._drop()
