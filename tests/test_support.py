"""The test harness itself: the broker fixture end to end, waiting helpers, ports, DB URL."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import BrokerInfo, parse_mqtt_url
from tests.support.mqtt import mqtt_client
from tests.support.net import LOOPBACK, accepts_connections, free_tcp_port
from tests.support.waiting import wait_for, wait_until


def test_broker_delivers_qos1_message(mqtt_broker: BrokerInfo) -> None:
    topic = f"emu/test/{uuid.uuid4().hex}/telemetry"
    payload = b'{"agent": "test", "seq": 1, "points": []}'
    with mqtt_client(mqtt_broker) as subscriber, mqtt_client(mqtt_broker) as publisher:
        subscriber.subscribe(topic, qos=1)
        publisher.publish(topic, payload, qos=1)
        message = subscriber.receive(what=f"the QoS 1 message on {topic}")
    assert message.topic == topic
    assert message.payload == payload
    assert message.qos == 1


def test_broker_info_matches_mode(mqtt_broker: BrokerInfo) -> None:
    assert accepts_connections(mqtt_broker.host, mqtt_broker.port)
    assert parse_mqtt_url(mqtt_broker.url) == (mqtt_broker.host, mqtt_broker.port)
    assert mqtt_broker.embedded == (not os.environ.get("EMU_TEST_MQTT_URL"))
    if mqtt_broker.embedded:
        assert mqtt_broker.host == LOOPBACK
        assert not mqtt_broker.shared_subscriptions


def test_shared_subscription_splits_messages(mqtt_broker: BrokerInfo) -> None:
    if not mqtt_broker.shared_subscriptions:
        pytest.skip(f"{mqtt_broker.url} offers no shared subscriptions")
    topic = f"emu/test/{uuid.uuid4().hex}/telemetry"
    group = f"$share/emu-test-{uuid.uuid4().hex[:8]}/{topic}"
    sent = [f"m{i:02d}".encode() for i in range(20)]
    v5 = mqtt.MQTTv5
    with (
        mqtt_client(mqtt_broker, protocol=v5) as first,
        mqtt_client(mqtt_broker, protocol=v5) as second,
        mqtt_client(mqtt_broker, protocol=v5) as publisher,
    ):
        first.subscribe(group)
        second.subscribe(group)
        for payload in sent:
            publisher.publish(topic, payload)
        wait_until(
            lambda: first.messages.qsize() + second.messages.qsize() >= len(sent),
            10.0,
            f"{len(sent)} messages through {group}",
        )
    got_first = [first.messages.get_nowait().payload for _ in range(first.messages.qsize())]
    got_second = [second.messages.get_nowait().payload for _ in range(second.messages.qsize())]
    assert sorted(got_first + got_second) == sent
    assert got_first
    assert got_second


def test_parse_mqtt_url_defaults_and_rejects() -> None:
    assert parse_mqtt_url("mqtt://127.0.0.1") == ("127.0.0.1", 1883)
    assert parse_mqtt_url("mqtt://broker.example:11883/") == ("broker.example", 11883)
    with pytest.raises(ValueError, match="mqtt://host"):
        parse_mqtt_url("http://127.0.0.1:1883")


def test_database_url_is_env_or_sqlite(database_url: str) -> None:
    expected = os.environ.get("EMU_TEST_DATABASE_URL")
    if expected:
        assert database_url == expected
    else:
        assert database_url.startswith("sqlite+aiosqlite:///")


def test_free_tcp_port_can_be_bound() -> None:
    port = free_tcp_port()
    assert not accepts_connections(LOOPBACK, port)
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))
        sock.listen()
        assert accepts_connections(LOOPBACK, port)


def test_wait_until_returns_truthy_value() -> None:
    values = iter([None, 0, "ready"])
    assert wait_until(lambda: next(values), 1.0, "a value") == "ready"


def test_wait_until_event_set_by_thread() -> None:
    event = threading.Event()
    timer = threading.Timer(0.01, event.set)
    timer.start()
    try:
        assert wait_until(event, 5.0, "the timer")
    finally:
        timer.cancel()


def test_wait_until_names_what_on_timeout() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the impossible"):
        wait_until(lambda: False, 0.05, "the impossible")
    with pytest.raises(AssertionError, match=r"waiting for an unset event"):
        wait_until(threading.Event(), 0.01, "an unset event")


async def test_wait_for_awaitable_event_and_predicates() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_soon(event.set)
    assert await wait_for(event, 5.0, "the event")

    future: asyncio.Future[int] = loop.create_future()
    loop.call_soon(future.set_result, 42)
    assert await wait_for(future, 5.0, "the future") == 42

    calls = iter([False, False, True])
    assert await wait_for(lambda: next(calls), 5.0, "the predicate")

    async def check() -> str:
        return "done"

    assert await wait_for(check, 5.0, "the async predicate") == "done"


async def test_wait_for_names_what_on_timeout() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the unset event"):
        await wait_for(asyncio.Event(), 0.01, "the unset event")
    with pytest.raises(AssertionError, match=r"waiting for never true"):
        await wait_for(lambda: False, 0.05, "never true")
