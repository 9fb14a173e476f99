"""Helper processes of the ingest benchmark: a telemetry publisher and a bare MQTT sink.

    python -m tests.bench.server_mqtt publish URL SITE AGENT FIRST_SEQ BATCHES FIRST_CYCLE
    python -m tests.bench.server_mqtt sink URL TOPIC MESSAGES

`publish` builds its batches first (JSON as the agent's batcher writes it: 5 units x 100
points per batch, one poll cycle, 50 units in the fleet), then publishes them at QoS 1 as
fast as the broker takes them (up to `INFLIGHT` unacknowledged) and prints one JSON line:
{"start": wall time of the first publish, "end": of the last PUBACK, "cpu": its CPU s}.
`sink` subscribes at QoS 1 (paho acknowledges on receipt), prints {"ready": true} once
subscribed, then counts messages and prints {"first": ..., "last": ...} (wall times) when it
has `MESSAGES`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

UNITS = 50
POINTS = 100
UNITS_PER_BATCH = 5
INFLIGHT = 200
START = datetime(2026, 7, 1, tzinfo=UTC)


def payloads(agent: str, first_seq: int, batches: int, first_cycle: int) -> list[bytes]:
    """`batches` telemetry batches of 500 readings, cycle after cycle of the fleet."""
    out: list[bytes] = []
    per_cycle = UNITS // UNITS_PER_BATCH
    for n in range(batches):
        cycle = first_cycle + n // per_cycle
        first_unit = (n % per_cycle) * UNITS_PER_BATCH
        ts = (START + timedelta(seconds=cycle)).isoformat(timespec="milliseconds")
        stamp = ts.replace("+00:00", "Z")
        points = [
            {"device": f"unit-{u:03d}", "point": f"m.P{p}", "ts": stamp,
             "value": round(cycle + u + p * 0.25, 2), "quality": "good"}
            for u in range(first_unit, first_unit + UNITS_PER_BATCH) for p in range(POINTS)
        ]
        doc = {"agent": agent, "seq": first_seq + n, "sent_at": stamp, "points": points}
        out.append(json.dumps(doc, separators=(",", ":")).encode())
    return out


def _client(connected: threading.Event) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311)
    client.on_connect = lambda *_: connected.set()
    return client


def _connect(client: mqtt.Client, url: str) -> None:
    parts = urlsplit(url)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)


def publish(url: str, site: str, agent: str, first_seq: int, batches: int,
            first_cycle: int) -> None:
    """Publish the batches at QoS 1, keeping up to INFLIGHT unacknowledged."""
    data = payloads(agent, first_seq, batches, first_cycle)
    connected = threading.Event()
    client = _client(connected)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    _connect(client, url)
    acked = threading.Semaphore(0)
    client.on_publish = lambda *_: acked.release()
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK")
    topic = f"emu/v1/{site}/telemetry"
    start = time.time()
    for payload in data:
        client.publish(topic, payload, qos=1)
    for _ in data:
        if not acked.acquire(timeout=120):
            raise SystemExit("PUBACKs stopped coming")
    end = time.time()
    client.disconnect()
    client.loop_stop()
    cpu = os.times()
    print(json.dumps({"start": start, "end": end, "cpu": cpu.user + cpu.system}), flush=True)


def sink(url: str, topic: str, messages: int) -> None:
    """Count messages on `topic` (QoS 1) and report the wall times of the first and last."""
    connected = threading.Event()
    done = threading.Event()
    seen = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(*_: object) -> None:
        now = time.time()
        if seen["n"] == 0:
            seen["first"] = now
        seen["n"] += 1
        if seen["n"] >= messages:
            seen["last"] = now
            done.set()

    subscribed = threading.Event()
    client = _client(connected)
    _connect(client, url)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK")
    client.subscribe(topic, 1)
    if not subscribed.wait(10):
        raise SystemExit("no SUBACK")
    print(json.dumps({"ready": True}), flush=True)
    if not done.wait(300):
        raise SystemExit(f"only {seen['n']} of {messages} messages")
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"first": seen["first"], "last": seen["last"]}), flush=True)


def main(argv: list[str]) -> None:
    """Command line (see the module docstring)."""
    if argv[0] == "publish":
        publish(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]))
    elif argv[0] == "sink":
        sink(argv[1], argv[2], int(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
