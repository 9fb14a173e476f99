"""MQTT mode: units publish JSON values to a broker, read here by a plain paho subscriber."""

from __future__ import annotations

import json
import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.mqtt import MqttPublisher
from simulators.server import SimConfig, Simulator
from tests.support.broker import BrokerInfo, close_client
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


async def test_units_publish_documented_json(mqtt_broker: BrokerInfo) -> None:
    sim = Simulator(SimConfig(units=2, port=0))
    received: dict[str, dict[str, Any]] = {}
    subscribed = threading.Event()
    got_both = threading.Event()
    prefix = f"emu-sim-test-{id(sim):x}"

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(f"{prefix}/+/values", qos=1)

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        received[msg.topic] = json.loads(msg.payload)
        if len(received) == 2:
            got_both.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-sub")
    sub.on_connect = on_connect
    sub.on_subscribe = on_subscribe
    sub.on_message = on_message
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    publisher = MqttPublisher(sim.units, mqtt_broker.host, mqtt_broker.port, interval_s=0.1,
                              prefix=prefix)
    try:
        await wait_for(subscribed.is_set, 5, "the subscription")
        await publisher.start()
        sim.unit(2).inject("comm_loss")
        publisher.publish_once()
        sim.unit(2).clear()
        await wait_for(got_both.is_set, 5, "a message from each unit")
    finally:
        await publisher.stop()
        close_client(sub)
    doc = received[f"{prefix}/{sim.unit(1).serial}/values"]
    assert doc["series"] == "EMU-BS"
    assert doc["unit"] == 1
    assert doc["ts"].endswith("Z")
    assert 0 <= doc["values"]["battery.SoC"] <= 100
    assert doc["values"]["common.SN"] == sim.unit(1).serial
