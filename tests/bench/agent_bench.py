"""Shared parts of the agent benchmarks: processes, /proc figures, broker, counting subscriber.

The agent benchmarks run every subject and baseline as its own process (so that each has an
event loop and a GIL of its own) and measure from outside: CPU time and memory come from
`/proc/<pid>/stat` and `/proc/<pid>/status`, machine load from `/proc/stat`. A process that
ignores SIGTERM is not an error here (a benchmark asserts sanity, not behaviour) but is
measured and reported, because it is worth knowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import BrokerInfo, EmbeddedBroker, external_broker
from tests.support.net import LOOPBACK, accepts_connections
from tests.support.waiting import wait_for, wait_until

MQTT_URL_ENV = "EMU_TEST_MQTT_URL"
MOSQUITTO_PORT = 1883
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
"""How long a process gets to exit after SIGTERM before it is killed (and reported)."""
CONNECT_TIMEOUT_S = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_SEQ_RE = re.compile(rb'"seq":(\d+)')
POINT_MARK = b'{"device":'
"""Opens every point of an uncompressed telemetry batch (the batcher writes compact JSON)."""


# -- /proc ------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid`, all threads (Linux /proc; None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime: fields 14, 15


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of process `pid` in KiB: resident now, and the peak so far."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {
        key: int(rest.split()[0])
        for key, _, rest in (line.partition(":") for line in status.splitlines())
        if key in ("VmRSS", "VmHWM")
    }
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0]
    except OSError:
        return None
    values = [int(v) for v in first.split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class CpuWindow:
    """CPU use of some processes, and of the whole machine, over one wall-clock window."""

    seconds: float
    process_cpu_s: dict[str, float | None]
    machine_busy: float | None
    """Fraction of all cores' time that was busy, 0..1."""

    def percent(self, name: str) -> float | None:
        """CPU of process `name` in % of one core (200 % = two cores flat out)."""
        cpu = self.process_cpu_s.get(name)
        return None if cpu is None else 100.0 * cpu / self.seconds


class CpuMeter:
    """Start/stop CPU accounting for named processes and the machine."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = time.monotonic()
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self._machine0 = machine_jiffies()

    def stop(self) -> CpuWindow:
        """The window from construction to now."""
        seconds = time.monotonic() - self._t0
        cpu: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._cpu0[name], cpu_seconds(pid)
            cpu[name] = None if before is None or after is None else after - before
        m0, m1 = self._machine0, machine_jiffies()
        busy = None
        if m0 is not None and m1 is not None and m1[1] > m0[1]:
            busy = (m1[0] - m0[0]) / (m1[1] - m0[1])
        return CpuWindow(seconds, cpu, busy)


# -- processes --------------------------------------------------------------------------------
@dataclass
class Stopped:
    """How a process ended after SIGTERM."""

    seconds: float = 0.0
    returncode: int | None = None
    killed: bool = False
    rss_kb_at_term: int | None = None
    rss_kb_at_kill: int | None = None

    def describe(self) -> str:
        """One line for the report."""
        if self.killed:
            grow = ""
            if self.rss_kb_at_term and self.rss_kb_at_kill:
                grow = (f", RSS {self.rss_kb_at_term / 1024:.0f} -> "
                        f"{self.rss_kb_at_kill / 1024:.0f} MiB meanwhile")
            return f"still running {self.seconds:.0f} s after SIGTERM, killed{grow}"
        return f"exited {self.returncode} {self.seconds:.1f} s after SIGTERM"


@dataclass
class Proc:
    """A benchmark process and how it stopped (filled in when its context ends)."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    stopped: Stopped = field(default_factory=Stopped)

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid

    async def output(self) -> str:
        """What it wrote so far."""
        return await asyncio.to_thread(self.log.read_text, errors="replace")

    async def check_alive(self) -> None:
        """Fail with its output if it has exited."""
        if self.proc.returncode is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}: {await self.output()}"
            )


@contextlib.asynccontextmanager
async def python_process(
    name: str, args: Sequence[str], log: Path, env: dict[str, str] | None = None,
    stop_timeout: float = STOP_TIMEOUT_S,
) -> AsyncIterator[Proc]:
    """Run `python -m ARGS`; on exit SIGTERM it, wait `stop_timeout`, then SIGKILL if needed."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args, stdout=out, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    handle = Proc(name, proc, log)
    try:
        yield handle
    finally:
        await _terminate(handle, stop_timeout)


async def _terminate(handle: Proc, stop_timeout: float) -> None:
    proc, stopped = handle.proc, handle.stopped
    if proc.returncode is not None:
        stopped.returncode = proc.returncode
        return
    mem = memory_kb(proc.pid)
    stopped.rss_kb_at_term = mem[0] if mem else None
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        stopped.returncode = await wait_for(proc.wait(), stop_timeout, f"{handle.name} to stop")
    except AssertionError:
        mem = memory_kb(proc.pid)
        stopped.rss_kb_at_kill = mem[0] if mem else None
        stopped.killed = True
        proc.kill()
        stopped.returncode = await proc.wait()
    stopped.seconds = time.monotonic() - start


async def wait_listening(handle: Proc, port: int) -> None:
    """Poll until `handle` accepts TCP connections on 127.0.0.1:`port`."""

    async def listening() -> bool:
        await handle.check_alive()
        return await asyncio.to_thread(accepts_connections, LOOPBACK, port, 0.2)

    await wait_for(listening, START_TIMEOUT_S, f"{handle.name} to listen on port {port}")


def sim_args(units: int, port: int, control_port: int, profile: str = "EMU-BS") -> list[str]:
    """`python -m` arguments of `emu sim` serving `units` units as ids 1..N on one port."""
    return ["emu", "sim", "--units", str(units), "--profile", profile, "--port", str(port),
            "--control-port", str(control_port)]


# -- broker -----------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_broker() -> Iterator[BrokerInfo]:
    """`EMU_TEST_MQTT_URL`, else the Mosquitto on 127.0.0.1:1883 if it answers, else amqtt."""
    url = os.environ.get(MQTT_URL_ENV)
    if not url and accepts_connections(LOOPBACK, MOSQUITTO_PORT):
        url = f"mqtt://{LOOPBACK}:{MOSQUITTO_PORT}"
    if url:
        yield external_broker(url)
        return
    broker = EmbeddedBroker()
    info = broker.start()
    try:
        yield info
    finally:
        broker.stop()


def unique_site(prefix: str) -> str:
    """A site id (and so a client id and topics) no other test on the same broker uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class CountingSubscriber:
    """A paho subscriber that counts messages, points and distinct `seq`s, with times.

    Points are counted by scanning the payload for `POINT_MARK` rather than parsing the JSON,
    so that the counter stays cheap next to the publisher it measures.
    """

    def __init__(self, broker: BrokerInfo, topic: str, qos: int = 1) -> None:
        self.broker = broker
        self.topic = topic
        self.qos = qos
        self.messages = 0
        self.points = 0
        self.bytes = 0
        self.seqs: set[int] = set()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"emu-bench-sub-{uuid.uuid4().hex[:8]}"
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def __enter__(self) -> CountingSubscriber:
        self._client.connect_async(self.broker.host, self.broker.port)
        self._client.loop_start()
        wait_until(self._connected, CONNECT_TIMEOUT_S, f"CONNACK from {self.broker.url}")
        self._client.subscribe(self.topic, self.qos)
        wait_until(self._subscribed, CONNECT_TIMEOUT_S, f"SUBACK for {self.topic}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def snapshot(self) -> tuple[float, int, int]:
        """(time.time(), messages, points) so far."""
        with self._lock:
            return time.time(), self.messages, self.points

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _m: int, codes: Any, _p: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        payload = msg.payload
        found = _SEQ_RE.search(payload, 0, 200)
        with self._lock:
            self.messages += 1
            self.points += payload.count(POINT_MARK)
            self.bytes += len(payload)
            if found:
                self.seqs.add(int(found.group(1)))
            if self.first_at is None:
                self.first_at = now
            self.last_at = now


def fmt(value: float | None, spec: str = ".0f") -> str:
    """`value` formatted, or n/a."""
    return "n/a" if value is None else format(value, spec)


def clear_status(broker: BrokerInfo, site: str, timeout: float = 5.0) -> bool:
    """Remove the retained `status` a benchmark agent left on the broker (its last word or will).

    Waits up to `timeout` for the retained `offline` to be there (a killed agent's will may
    still be on its way), then publishes an empty retained message over it. True if it was seen.
    """
    topic = f"emu/v1/{site}/status"
    seen = threading.Event()
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"emu-bench-clear-{uuid.uuid4().hex[:8]}")

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            connected.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if b"offline" in msg.payload:
            seen.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect_async(broker.host, broker.port)
    client.loop_start()
    try:
        wait_until(connected, CONNECT_TIMEOUT_S, f"CONNACK from {broker.url}")
        client.subscribe(topic, 1)
        found = seen.wait(timeout)
        info = client.publish(topic, b"", qos=1, retain=True)
        info.wait_for_publish(CONNECT_TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    return found
