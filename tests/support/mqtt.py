"""A paho-mqtt test client that connects, subscribes and collects messages with deadlines."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.broker import BrokerInfo, close_client
from tests.support.waiting import wait_until

TIMEOUT = 10.0


class TestClient:
    """A connected paho client whose received messages land in `messages`."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self._suback: dict[int, list[ReasonCode]] = {}
        self._suback_event = threading.Condition()
        self.connect_reason: ReasonCode | None = None

    def subscribe(self, topic: str, qos: int = 1, timeout: float = TIMEOUT) -> None:
        """Subscribe and wait for a SUBACK that grants the subscription."""
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"SUBSCRIBE {topic!r} not sent: {result}"
        assert mid is not None
        with self._suback_event:
            granted = self._suback_event.wait_for(lambda: mid in self._suback, timeout)
        assert granted, f"timed out after {timeout:g} s waiting for SUBACK of {topic!r}"
        codes = self._suback.pop(mid)
        assert not any(code.is_failure for code in codes), f"SUBSCRIBE {topic!r} refused: {codes}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = TIMEOUT) -> None:
        """Publish and, for QoS > 0, wait until the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"PUBLISH to {topic!r} not acknowledged in {timeout:g} s"

    def receive(self, timeout: float = TIMEOUT, what: str = "an MQTT message") -> mqtt.MQTTMessage:
        """Return the next received message, failing after `timeout` seconds."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connect_reason = reason_code
        self.connected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._suback_event:
            self._suback[mid] = reason_codes
            self._suback_event.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)


@contextmanager
def mqtt_client(
    broker: BrokerInfo,
    *,
    client_id: str | None = None,
    protocol: MQTTProtocolVersion = mqtt.MQTTv311,
    timeout: float = TIMEOUT,
) -> Iterator[TestClient]:
    """Connect a paho client (VERSION2 callbacks) to `broker`; disconnect it on exit."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"emu-test-{uuid.uuid4().hex[:12]}",
        protocol=protocol,
    )
    wrapper = TestClient(client)
    client.on_connect = wrapper._on_connect
    client.on_subscribe = wrapper._on_subscribe
    client.on_message = wrapper._on_message
    client.connect_async(broker.host, broker.port)
    client.loop_start()
    try:
        wait_until(wrapper.connected, timeout, f"CONNACK from {broker.url}")
        reason = wrapper.connect_reason
        assert reason is not None
        assert not reason.is_failure, f"{broker.url} refused the connection: {reason}"
        yield wrapper
    finally:
        close_client(client)
