"""The MQTT collector: payloads to samples, garbage survived, silence to comm_lost.

The first tests feed `MqttSource.on_message` directly (no broker); the integration tests run
the simulator's MQTT publisher and a plain paho client against the test broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.config import DeviceSettings, LocalMqttSettings
from agent.devices.mqtt import MqttSource
from protocols.clock import ManualClock
from protocols.messages import EventKind, Quality, Severity
from protocols.profiles import load_profile
from simulators.mqtt import MqttPublisher
from simulators.server import SimConfig, Simulator
from tests.support.broker import BrokerInfo
from tests.support.mqtt import mqtt_client
from tests.support.net import free_tcp_port
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for

LOGGER = "agent.devices.mqtt"
TIMEOUT = 10.0


def unique_prefix() -> str:
    return f"emu-test-{uuid.uuid4().hex[:10]}"


def mqtt_device(topic: str, **extra: Any) -> DeviceSettings:
    settings: dict[str, Any] = {"poll_interval_s": 0.2, "comm_loss_after": 2, **extra}
    return DeviceSettings(name="bs1", protocol="mqtt", profile="EMU-BS", topic=topic, **settings)


def source_for(topic: str = "site/+/values", url: str = "mqtt://127.0.0.1:1883",
               clock: ManualClock | None = None, **extra: Any) -> tuple[MqttSource, RecordingSink]:
    sink = RecordingSink()
    source = MqttSource(mqtt_device(topic, **extra), load_profile("EMU-BS"),
                        LocalMqttSettings(url=url), sink, clock)
    return source, sink


def doc(values: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"serial": "S1", "series": "EMU-BS", "unit": 1, "seq": 1,
                       "values": values, **extra}).encode()


# -- mapping, without a broker --------------------------------------------------------------


def test_values_become_samples_with_quality_and_payload_time() -> None:
    source, sink = source_for()
    source.on_message("site/S1/values", doc(
        {"battery.SoC": 55.5, "common.SN": "S1", "emu.Status": 2, "battery.SoH": None,
         "inverter_three_phase.W_SF": 1},
        ts="2026-11-25T14:00:00.000Z"))
    source.on_message("site/S1/values", doc({"battery.SoC": 150}, ts=1_764_079_260_000))
    (_, ts1, first), (_, ts2, second) = sink.cycles
    assert ts1 == datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    assert ts2 == datetime(2025, 11, 25, 14, 1, tzinfo=UTC)
    assert first == [("battery.SoC", 55.5, Quality.GOOD), ("common.SN", "S1", Quality.GOOD),
                     ("emu.Status", 2, Quality.GOOD)]  # null and scale factors are not samples
    assert second == [("battery.SoC", 150, Quality.OUT_OF_RANGE)]
    h = source.health()
    assert (h["messages"], h["accepted"], h["malformed"], h["unknown"], h["errors"]) == (
        2, 2, 0, 0, 0)
    assert h["comm_lost"] is False
    json.dumps(h)


def test_a_message_without_ts_is_stamped_now() -> None:
    clock = ManualClock(datetime(2026, 3, 1, 8, 0, tzinfo=UTC))
    source, sink = source_for(clock=clock)
    source.on_message("site/S1/values", doc({"battery.SoC": 50}))
    assert sink.cycles[0][1] == clock.now()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2, 3]", "expected a JSON object, got list"),
        (b'{"serial": "S1"}', "no 'values' object"),
        (b'{"values": [1, 2]}', "no 'values' object"),
        (b'{"values": {"battery.SoC": NaN}}', "not JSON"),
        (b'{"ts": "yesterday", "values": {"battery.SoC": 1}}', "not ISO-8601"),
        (b'{"ts": true, "values": {"battery.SoC": 1}}', "ts must be"),
        (b'{"ts": 1e300, "values": {"battery.SoC": 1}}', "not a usable epoch"),
    ],
)
def test_malformed_messages_are_counted_and_logged(
    payload: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, sink = source_for()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    source.on_message("site/S1/values", payload)
    assert source.health()["malformed"] == 1
    assert source.health()["accepted"] == 0
    assert not sink.cycles
    assert reason in caplog.text


def test_values_of_the_wrong_type_are_dropped_and_the_rest_kept() -> None:
    source, sink = source_for()
    source.on_message("site/S1/values", doc(
        {"battery.SoC": "full", "common.SN": 7, "emu.Alarm": 1.5, "battery.SoH": True,
         "inverter_three_phase.W": {"v": 1}, "battery.V": "HUGE", "emu.Status": 3.0,
         "inverter_three_phase.Hz": 50}).replace(b'"HUGE"', b"1e400"))  # parses as inf
    assert sink.cycles[0][2] == [("emu.Status", 3, Quality.GOOD),
                                 ("inverter_three_phase.Hz", 50, Quality.GOOD)]
    assert source.health()["malformed"] == 1  # one message, however many bad values
    assert "battery.SoC" in (source.health()["last_error"] or "")


def test_unknown_points_are_counted_each_time_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, sink = source_for()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):
        source.on_message("site/S1/values", doc({"nope.Volts": 1, "battery.SoC": 40}))
    assert source.health()["unknown"] == 3
    assert caplog.text.count("nope.Volts") == 1
    assert len(sink.cycles) == 3


def test_malformed_logging_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    source, _ = source_for()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(250):
        source.on_message("site/S1/values", b"nope")
    assert source.health()["malformed"] == 250
    assert len(caplog.records) == 10 + 2  # the first ten, then #100 and #200


def test_alarm_bits_and_state_changes_become_events() -> None:
    source, sink = source_for()
    source.on_message("site/S1/values", doc({"emu.Alarm": 0, "emu.Status": 2}))
    source.on_message("site/S1/values", doc({"emu.Alarm": 0b1001, "emu.Status": 4}))
    source.on_message("site/S1/values", doc({"emu.Alarm": 0b1000, "emu.Status": 4}))
    assert [(k, code, sev) for k, _, code, sev, _ in sink.events] == [
        (EventKind.ALARM_RAISED, "OVER_TEMPERATURE", Severity.ALARM),
        (EventKind.ALARM_RAISED, "TRIP", Severity.ALARM),
        (EventKind.STATE_CHANGED, "FAULT", Severity.INFO),
        (EventKind.ALARM_CLEARED, "OVER_TEMPERATURE", Severity.INFO),
    ]
    assert sink.events[2][4] == {"point": "emu.Status", "from": "RUNNING", "to": "FAULT"}


def test_silence_is_comm_lost_and_a_message_restores_it() -> None:
    clock = ManualClock()
    source, sink = source_for(clock=clock)
    source.on_message("site/S1/values", doc({"battery.SoC": 40}))
    clock.advance(0.3)
    source.check_silence()
    assert not source.comm_lost  # 0.3 s < 2 x 0.2 s
    clock.advance(0.2)
    source.check_silence()
    source.check_silence()
    assert source.comm_lost
    assert sink.kinds() == [EventKind.COMM_LOST]
    assert sink.cycles[-1][2] == [("battery.SoC", None, Quality.COMM_LOST)]
    source.on_message("site/S1/values", doc({"battery.SoC": 41}))
    assert sink.kinds() == [EventKind.COMM_LOST, EventKind.COMM_RESTORED]
    assert not source.comm_lost


async def test_unreachable_broker_retries_and_loses_comm() -> None:
    source, sink = source_for(url=f"mqtt://127.0.0.1:{free_tcp_port()}", poll_interval_s=0.1)
    async with running(source, wait_connected=False):
        await wait_for(lambda: source.health()["reconnects"] >= 2, TIMEOUT, "two reconnects")
        await wait_for(lambda: source.comm_lost, TIMEOUT, "comm_lost without a broker")
    assert sink.kinds() == [EventKind.COMM_LOST]
    assert sink.events[0][4]["connected"] is False
    assert "connecting to" in (source.health()["last_error"] or "")


# -- against the broker ---------------------------------------------------------------------


@asynccontextmanager
async def running(source: MqttSource, wait_connected: bool = True) -> AsyncIterator[None]:
    """`source.run()` as a task, subscribed before the body runs, cancelled after it."""
    task = asyncio.create_task(source.run())
    try:
        if wait_connected:
            await wait_for(lambda: source.connected or task.done(), TIMEOUT, "the subscription")
            assert not task.done()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def publishing(
    sim: Simulator, broker: BrokerInfo, prefix: str, interval_s: float = 0.05
) -> AsyncIterator[MqttPublisher]:
    publisher = MqttPublisher(sim.units, broker.host, broker.port, interval_s=interval_s,
                              prefix=prefix, clock=sim.units[0].clock)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


@pytest.mark.integration
async def test_simulator_messages_arrive_as_samples(mqtt_broker: BrokerInfo) -> None:
    clock = ManualClock()  # the unit's values stand still, so they can be compared exactly
    sim = Simulator(SimConfig(units=1, port=0, profiles=["EMU-BS"]), clock=clock)
    unit = sim.unit(1)
    prefix = unique_prefix()
    source, sink = source_for(f"{prefix}/+/values", mqtt_broker.url)
    async with running(source), publishing(sim, mqtt_broker, prefix):
        await wait_for(lambda: len(sink.cycles) >= 2, TIMEOUT, "two messages as samples")
    device, ts, samples = sink.cycles[0]
    assert (device, ts) == ("bs1", clock.now())
    got = {n: (v, q) for n, v, q in samples}
    telemetry = {p.name for p in unit.profile.poll_points if not p.name.endswith("_SF")}
    want = {n: round(v, 4) if isinstance(v, float) else v
            for n, v in unit.values().items() if n in telemetry and v is not None}
    assert {n: v for n, (v, _) in got.items()} == want
    assert got["common.SN"] == (unit.serial, Quality.GOOD)
    assert got["battery.SoC"][1] is Quality.GOOD
    h = source.health()
    assert (h["malformed"], h["unknown"], h["errors"]) == (0, 0, 0)
    assert h["accepted"] == h["messages"] >= 2


@pytest.mark.integration
async def test_garbage_on_the_topic_is_survived(
    mqtt_broker: BrokerInfo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    prefix = unique_prefix()
    topic = f"{prefix}/S1/values"
    source, sink = source_for(f"{prefix}/+/values", mqtt_broker.url)
    async with running(source):
        with mqtt_client(mqtt_broker) as pub:
            for bad in (b"\x00\x01garbage", b"[1, 2]", b'{"serial": "S1", "seq": 3}'):
                pub.publish(topic, bad)
            pub.publish(topic, doc({"nope.X": 1, "battery.SoC": 12.5}))
            pub.publish(topic, doc({"nope.X": 2, "battery.SoC": 13.5}))
        await wait_for(lambda: source.health()["messages"] >= 5, TIMEOUT, "all five messages")
    h = source.health()
    assert (h["malformed"], h["unknown"], h["accepted"], h["errors"]) == (3, 2, 2, 0)
    assert [s for _, _, s in sink.cycles] == [[("battery.SoC", 12.5, Quality.GOOD)],
                                              [("battery.SoC", 13.5, Quality.GOOD)]]
    malformed = [r for r in caplog.records if "malformed message" in r.getMessage()]
    assert len(malformed) == 3
    assert "not JSON" in malformed[0].getMessage()
    assert caplog.text.count("'nope.X'") == 1


@pytest.mark.integration
async def test_a_silent_unit_is_comm_lost_until_it_publishes_again(
    mqtt_broker: BrokerInfo,
) -> None:
    sim = Simulator(SimConfig(units=1, port=0, profiles=["EMU-BS"]))
    prefix = unique_prefix()
    source, sink = source_for(f"{prefix}/+/values", mqtt_broker.url)
    async with running(source), publishing(sim, mqtt_broker, prefix):
        await wait_for(lambda: sink.cycles, TIMEOUT, "the first message")
        sim.unit(1).inject("comm_loss")
        await wait_for(lambda: source.comm_lost, TIMEOUT, "comm_lost after 2 x 0.2 s of silence")
        sim.unit(1).clear("comm_loss")
        await wait_for(lambda: not source.comm_lost, TIMEOUT, "comm_restored")
    kinds = sink.kinds()
    assert kinds[:2] == [EventKind.COMM_LOST, EventKind.COMM_RESTORED]
    lost = sink.events[0]
    assert (lost[2], lost[3]) == ("comm_lost", Severity.ALARM)
    assert lost[4]["silent_s"] >= 0.4
    marked = [s for _, _, s in sink.cycles if s and s[0][2] is Quality.COMM_LOST]
    assert marked
    assert {n for n, _, _ in marked[0]} >= {"battery.SoC", "common.SN"}
    assert sink.latest()["battery.SoC"][1] is Quality.GOOD  # the unit is back
