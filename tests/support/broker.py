"""The MQTT broker the tests talk to: an external one named by URL, or amqtt in-process.

CI points `EMU_TEST_MQTT_URL` at Mosquitto; without it a newcomer's `pytest` starts amqtt on a
free loopback port in a thread with its own event loop, so sync and async tests (each on their
own loop) can all reach it. amqtt speaks MQTT 3.1.1 only and has no shared subscriptions; an
external broker is probed once over MQTT 5 to learn whether it offers them.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from emu.broker import ClosingBroker, broker_config
from tests.support.net import LOOPBACK, accepts_connections, free_tcp_port
from tests.support.waiting import wait_until

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
PROBE_TIMEOUT = 10.0
_BIND_ATTEMPTS = 3


def close_client(client: mqtt.Client) -> None:
    """Disconnect, stop the network thread and close every socket the client holds, now.

    paho closes its internal wake-up socket pair only in `__del__`; a client in a reference
    cycle (callbacks bound to a wrapper that holds it) reaches the collector later, where the
    sockets may be finalised first and warn as unclosed, blamed on whichever test is running
    then. paho offers no public close (eclipse-paho/paho.mqtt.python#627), hence the private
    `_reset_sockets`.
    """
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()


@dataclass(frozen=True)
class BrokerInfo:
    """Where the test broker listens and what it can do."""

    host: str
    port: int
    url: str
    embedded: bool
    shared_subscriptions: bool


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Return (host, port) of an `mqtt://host[:port]` URL; reject anything else clearly."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"EMU_TEST_MQTT_URL must look like mqtt://host[:port], got {url!r}")
    if parts.username or parts.password or parts.path not in ("", "/"):
        raise ValueError(f"EMU_TEST_MQTT_URL takes no credentials or path, got {url!r}")
    return parts.hostname, parts.port or 1883


def external_broker(url: str) -> BrokerInfo:
    """Describe the broker at `url` after checking that it accepts connections."""
    host, port = parse_mqtt_url(url)
    wait_until(
        lambda: accepts_connections(host, port),
        START_TIMEOUT,
        f"the MQTT broker at {url} (EMU_TEST_MQTT_URL) to accept connections",
    )
    return BrokerInfo(
        host=host,
        port=port,
        url=f"mqtt://{host}:{port}",
        embedded=False,
        shared_subscriptions=_offers_shared_subscriptions(host, port),
    )


def _offers_shared_subscriptions(host: str, port: int) -> bool:
    """Connect over MQTT 5 and read CONNACK's Shared Subscription Available (default: yes)."""
    outcome: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        available = getattr(properties, "SharedSubscriptionAvailable", 1)
        outcome["shared"] = not reason_code.is_failure and bool(available)
        done.set()

    def on_connect_fail(client: mqtt.Client, userdata: Any) -> None:
        outcome["shared"] = False
        done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"emu-test-probe-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail
    client.connect_async(host, port)
    client.loop_start()
    try:
        wait_until(done, PROBE_TIMEOUT, f"an MQTT 5 CONNACK from {host}:{port}")
    finally:
        close_client(client)
    return outcome["shared"]


class EmbeddedBroker:
    """amqtt on a loopback port, run by a daemon thread with its own event loop."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def info(self) -> BrokerInfo:
        """The address tests connect to."""
        return BrokerInfo(
            host=self.host,
            port=self.port,
            url=f"mqtt://{self.host}:{self.port}",
            embedded=True,
            shared_subscriptions=False,
        )

    def start(self) -> BrokerInfo:
        """Start the broker and return once it accepts connections."""
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            self.port = free_tcp_port(self.host)
            self._started.clear()
            self._error = None
            self._thread = threading.Thread(target=self._run, name="amqtt-test-broker", daemon=True)
            self._thread.start()
            wait_until(self._started, START_TIMEOUT, "the embedded amqtt broker to start")
            if self._error is None:
                break
            self._thread.join(STOP_TIMEOUT)
            if attempt == _BIND_ATTEMPTS:
                raise RuntimeError(
                    f"the embedded amqtt broker failed to start on {self.host}:{self.port}"
                ) from self._error
        wait_until(
            lambda: accepts_connections(self.host, self.port),
            START_TIMEOUT,
            f"the embedded amqtt broker on {self.host}:{self.port} to accept connections",
        )
        return self.info

    def stop(self) -> None:
        """Shut the broker down and wait for its thread to end."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise AssertionError(f"the embedded amqtt broker did not stop in {STOP_TIMEOUT:g} s")
        self._thread = None

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        broker = ClosingBroker(broker_config(self.host, self.port))
        try:
            await broker.start()
        except Exception as exc:  # reported to the starting thread, which raises it
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await broker.shutdown()
