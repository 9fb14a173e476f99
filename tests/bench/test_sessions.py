"""Benchmarks of remote sessions: approval -> engineer-ready latency; tunnel throughput.

Latency: the time from the customer's approval (committed) until the gateway holds the
agent's tunnel with every approved target, and until the engineer's stock `ssh ... echo ok`
has run through it, over ROUNDS sessions on loopback (SQLite, the real gateway and agent
tunnel). Baseline: a bare asyncssh connect + public-key auth to the same gateway (the SSH
handshake every approval has to pay at least once).

Throughput: PAYLOAD bytes written into an OpenSSH `-L` port and counted at a TCP sink, through
the session (ssh -> gateway -> agent's reverse channel -> sink; the agent in a process of its
own, as on a real site gateway) versus a direct OpenSSH `-L`
through a plain asyncssh SSH server that forwards itself (`connection_requested` -> True) to
the same sink, alternating rounds in the same run. No sshd is used (none is installed).

Run with the other benchmarks: `pytest -m bench tests/bench/test_sessions.py -s`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import pytest

from protocols.clock import SystemClock
from server.core.db import Database, migrate_sync
from server.sessions import service
from server.sessions.gateway import SERVER_CIPHERS, WINDOW
from tests.server.sessions.harness import SSH, session_rig
from tests.support.net import free_tcp_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.bench

ROUNDS = 20
PAYLOAD = 64 * 1024 * 1024
THROUGHPUT_ROUNDS = 3
CHUNK = 256 * 1024


class Sink:
    """A TCP server that counts what it receives."""

    def __init__(self) -> None:
        self.received = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1 << 20):
            self.received += len(chunk)
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bench.db'}"
    await asyncio.to_thread(migrate_sync, url)
    database = Database(url)
    yield database
    await database.close()


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


async def test_approval_to_engineer_ready_latency(db: Database, tmp_path: Path) -> None:
    sink = Sink()
    await sink.start()
    ready, echo, bare = [], [], []
    async with session_rig(db, tmp_path, SystemClock(), None,
                           units={"unit1": ("127.0.0.1", sink.port)}) as rig:
        client_key = asyncssh.import_private_key(rig.engineer_key.read_bytes())
        for _ in range(ROUNDS):
            session = await rig.request(gateway_shell=True, units=("unit1",))
            started = time.perf_counter()
            await rig.approve(session)
            assert await rig.gateway.wait_ready(session, 10.0)
            ready.append(time.perf_counter() - started)
            rc, out, _ = await rig.ssh(session, "echo", "ok")
            echo.append(time.perf_counter() - started)
            assert (rc, out) == (0, "ok\n")
            t0 = time.perf_counter()
            async with asyncssh.connect("127.0.0.1", rig.gateway.port, username=session,
                                        client_keys=[client_key], known_hosts=None,
                                        agent_path=None, config=None):
                bare.append(time.perf_counter() - t0)
            await rig.revoke(session)
    await sink.close()
    print(f"\nsession approval -> engineer ready, {ROUNDS} sessions on loopback (SQLite):")
    print(f"  tunnel ready:      median {statistics.median(ready) * 1e3:7.1f} ms   "
          f"p95 {p95(ready) * 1e3:7.1f} ms")
    print(f"  `ssh echo ok` done: median {statistics.median(echo) * 1e3:7.1f} ms   "
          f"p95 {p95(echo) * 1e3:7.1f} ms   (goal p95 < 2000 ms)")
    print(f"  baseline bare SSH connect+auth: median {statistics.median(bare) * 1e3:.1f} ms; "
          f"ready/baseline = {statistics.median(ready) / statistics.median(bare):.2f}x")
    assert p95(echo) < 10.0  # sanity only


async def push(port: int, size: int, sink: Sink) -> float:
    """Seconds to get `size` bytes through 127.0.0.1:`port` into the sink."""
    before = sink.received

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return None

    opened = await wait_for(connect, 10.0, "the -L port to accept")
    assert opened is not None
    _, writer = opened
    block = b"\x5a" * CHUNK
    started = time.perf_counter()
    sent = 0
    while sent < size:
        writer.write(block)
        await writer.drain()
        sent += len(block)
    await wait_for(lambda: sink.received - before >= size, 120.0, "the sink to get everything")
    elapsed = time.perf_counter() - started
    writer.close()
    await writer.wait_closed()
    return elapsed


class _Forwarder(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no auth: a loopback baseline only

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        return True


@asynccontextmanager
async def direct_server() -> AsyncIterator[int]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Forwarder, "127.0.0.1", 0, server_host_keys=[key],
                                          encryption_algs=list(SERVER_CIPHERS), window=WINDOW)
    try:
        yield server.get_port()
    finally:
        server.close()
        await server.wait_closed()


async def spawn_forward(args: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)


async def stop(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    await proc.wait()


async def test_tunnel_throughput_vs_direct_openssh_forward(db: Database, tmp_path: Path) -> None:
    sink = Sink()
    await sink.start()
    via_session, direct = [], []
    async with session_rig(db, tmp_path, SystemClock(), None,
                           units={"unit1": ("127.0.0.1", sink.port)}) as rig, \
            direct_server() as direct_port:
        session = await rig.request(gateway_shell=False, units=("unit1",))
        async with rig.db.session() as dbs:  # approve without the in-process agent ...
            grant = service.grant_of(await service.approve(dbs, session, rig.customer,
                                                           now=rig.clock.now()), approved=True)
        agent = await asyncio.create_subprocess_exec(  # ... which runs in its own process
            sys.executable, "-m", "tests.bench.session_agent",
            rig.agent.settings.model_dump_json(), grant.model_dump_json(),
            stdin=asyncio.subprocess.PIPE)
        assert await rig.gateway.wait_ready(session, 20.0)
        for _ in range(THROUGHPUT_ROUNDS):
            port = free_tcp_port()
            proc = await spawn_forward(rig.ssh_args(session, "-N", "-L", f"{port}:unit1:502"))
            via_session.append(PAYLOAD / await push(port, PAYLOAD, sink))
            await stop(proc)
            port = free_tcp_port()
            args = [SSH, "-F", "/dev/null", "-p", str(direct_port), "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=ERROR", "-N", "-L", f"{port}:127.0.0.1:{sink.port}",
                    "bench@127.0.0.1"]
            proc = await spawn_forward(args)
            direct.append(PAYLOAD / await push(port, PAYLOAD, sink))
            await stop(proc)
        assert agent.stdin is not None
        agent.stdin.close()
        await agent.wait()
    await sink.close()
    s, d = statistics.median(via_session), statistics.median(direct)
    print(f"\ntunnel throughput, {PAYLOAD >> 20} MiB x {THROUGHPUT_ROUNDS} rounds on loopback:")
    print(f"  session (ssh -L -> gateway -> agent process -> sink): {s / 1e6:8.1f} MB/s")
    print(f"  direct OpenSSH -L via a forwarding asyncssh server: {d / 1e6:8.1f} MB/s")
    print(f"  ratio session/direct = {s / d:.2f} (goal >= 0.5)")
    assert s > 0

