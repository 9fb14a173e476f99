"""MQTT mode: units publish their values as JSON, like MQTT-native EMUs on a site broker.

Topic `emu-sim/{serial}/values` (prefix configurable), QoS 0, one message per unit per
interval. Payload (documented in docs/simulator.md):

    {"serial": "EMU-BS100-000001", "series": "EMU-BS", "unit": 1, "seq": 17,
     "ts": "2026-11-25T14:00:00.000Z", "values": {"battery.SoC": 45.5, ...}}

`values` are keyed by profile point name, in engineering units; a unit with `comm_loss`
publishes nothing, `intermittent_comms` drops a share of messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocols.clock import Clock, SystemClock
from simulators.errors import SimulatorError
from simulators.unit import SimUnit

log = logging.getLogger(__name__)


def payload(unit: SimUnit, seq: int, clock: Clock) -> bytes:
    """The JSON message a unit publishes."""
    values: dict[str, Any] = {}
    for name, value in unit.values().items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        values[name] = round(value, 4) if isinstance(value, float) else value
    ts = clock.now().isoformat(timespec="milliseconds").replace("+00:00", "Z")
    doc = {
        "serial": unit.serial,
        "series": unit.profile.series,
        "unit": unit.unit_id,
        "seq": seq,
        "ts": ts,
        "values": values,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


class MqttPublisher:
    """Publishes every unit's values to a broker every `interval_s` seconds."""

    def __init__(
        self,
        units: list[SimUnit],
        host: str,
        port: int = 1883,
        *,
        interval_s: float = 1.0,
        prefix: str = "emu-sim",
        clock: Clock | None = None,
    ) -> None:
        self.units = units
        self.host, self.port = host, port
        self.interval_s = interval_s
        self.prefix = prefix
        self.clock = clock or SystemClock()
        self.sent = 0
        self._seq = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"emu-sim-{id(self):x}")
        self._task: asyncio.Task[None] | None = None

    def topic(self, unit: SimUnit) -> str:
        """Where a unit publishes."""
        return f"{self.prefix}/{unit.serial}/values"

    async def start(self, wait_s: float = 10.0) -> None:
        """Connect (waiting for the broker's CONNACK) and start publishing."""
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[Any] = loop.create_future()

        def on_connect(
            client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
        ) -> None:
            if not connected.done():
                loop.call_soon_threadsafe(
                    connected.set_result if not reason.is_failure else connected.set_exception,
                    reason if not reason.is_failure else SimulatorError(f"broker said {reason}"),
                )

        self._client.on_connect = on_connect
        try:
            self._client.connect_async(self.host, self.port)
            self._client.loop_start()
            await asyncio.wait_for(connected, wait_s)
        except (OSError, TimeoutError) as exc:
            self._client.loop_stop()
            where = f"{self.host}:{self.port}"
            raise SimulatorError(f"cannot reach MQTT broker {where}: {exc}") from exc
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.publish_once()
            next_at += self.interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def publish_once(self) -> None:
        """Publish one message per answering unit."""
        self._seq += 1
        for unit in self.units:
            if not unit.answering() or unit.misses():
                continue
            self._client.publish(self.topic(unit), payload(unit, self._seq, self.clock))
            self.sent += 1

    async def stop(self) -> None:
        """Stop publishing and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._client.disconnect()
        self._client.loop_stop()
