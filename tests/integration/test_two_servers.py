"""Two `emu server` processes on one database and one broker: each batch is stored once.

Both are real processes (`python -m emu server -c server-N.toml`, roles api + ingest, one
of them also the scheduler, as deploy/compose.yml runs them), started together on a fresh
database: on PostgreSQL both migrate at start, and the advisory lock in the migrations lets
one do it while the other waits. They subscribe with the same shared-subscription group,
so the broker splits the site's batches between them (Mosquitto in CI; amqtt offers no
sharing, so there each receives every batch). A publisher sends an agent's batches and then
replays half of them, as an agent does after an outage: every (agent, seq) must be stored
exactly once, with exactly its readings, and with a sharing broker both processes must have
stored some. (SLA timers fired once across two processes: tests/server/tickets/
test_sla_processes.py.)
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from protocols.topics import TopicKind, topic
from server.core.db import Database, migrate_sync
from server.enrolment import new_password
from tests.bench.server_data import T0, batch_bytes, make_site, points_doc
from tests.support.broker import BrokerInfo
from tests.support.database import fresh_database
from tests.support.mqtt import mqtt_client
from tests.support.net import LOOPBACK
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

BATCHES = 60
REPLAYED = 30
DEVICES = ("u1", "u2")
POINTS = 10
DEADLINE = 60.0
_STORED = re.compile(
    r'^emu_ingest_batches_total\{outcome="(\w+)",stream="telemetry"\} ([\d.e+]+)$', re.M)


@dataclass
class Server:
    """A running `emu server` process and what it printed."""

    name: str
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    base: str | None = None

    def printed(self, text: str) -> bool:
        """Whether any line so far contains `text`."""
        return any(text in line for line in self.lines)

    def output(self) -> str:
        """Everything it printed (for failure messages)."""
        return "".join(self.lines)


async def _pump(server: Server) -> None:
    """Keep reading its output (a full pipe would block its logging)."""
    assert server.proc.stdout is not None
    while line := await server.proc.stdout.readline():
        text = line.decode(errors="replace")
        server.lines.append(text)
        if server.base is None and (m := re.search(r"api (https?://\S+?)/api/v1/", text)):
            server.base = m.group(1)


@asynccontextmanager
async def _server(tmp: Path, name: str, url: str, broker: BrokerInfo, group: str,
                  roles: list[str], migrate: bool) -> AsyncIterator[Server]:
    conf = tmp / f"{name}.toml"
    conf.write_text(
        f'database_url = "{url}"\nroles = {roles!r}\nsecret_key = "{new_password()}"\n'
        f"migrate_on_start = {'true' if migrate else 'false'}\n"
        f'[http]\nhost = "{LOOPBACK}"\nport = 0\n'
        f'[mqtt]\nurl = "{broker.url}"\nshared_group = "{group}"\n'.replace("'", '"'),
        encoding="utf-8")  # no client_id: no persistent session left on a shared broker
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emu", "server", "-c", str(conf), "-v",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=tmp)
    server = Server(name, proc)
    reader = asyncio.create_task(_pump(server))
    try:
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await wait_for(proc.wait(), DEADLINE, f"{name} to stop")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await reader


async def _counts(db: Database, agent: str) -> tuple[int, int]:
    """(batches claimed, telemetry rows) of `agent`."""
    async with db.session() as session:
        conn = await session.connection()
        batches = (await conn.execute(sa.text(
            "SELECT count(*) FROM ingestedbatch WHERE agent = :a AND stream = 'telemetry'"),
            {"a": agent})).scalar_one()
        rows = (await conn.execute(sa.text(
            "SELECT count(*) FROM telemetry t JOIN series s ON s.id = t.series_id"
            " JOIN unit u ON u.id = s.unit_id JOIN site ON site.id = u.site_id"
            " WHERE site.code = :a"), {"a": agent})).scalar_one()
    return int(batches), int(rows)


async def _outcomes(client: httpx.AsyncClient, server: Server) -> dict[str, float]:
    text = (await client.get(f"{server.base}/metrics")).text
    return {outcome: float(n) for outcome, n in _STORED.findall(text)}


async def test_two_servers_store_each_batch_once(
    mqtt_broker: BrokerInfo, database_url: str, tmp_path: Path
) -> None:
    site = f"two-{uuid.uuid4().hex[:8]}"
    group = f"emu-two-{uuid.uuid4().hex[:6]}"  # not shared with other tests' servers
    postgres = database_url.startswith("postgresql")
    with fresh_database(database_url, tmp_path) as url:
        if not postgres:  # SQLite: no concurrent migrations; one schema first
            migrate_sync(url)
        async with AsyncExitStack() as stack:
            servers = [
                await stack.enter_async_context(_server(
                    tmp_path, f"server-{n}", url, mqtt_broker, group, roles, postgres))
                for n, roles in enumerate((["api", "ingest", "scheduler"], ["api", "ingest"]),
                                          start=1)
            ]
            for s in servers:
                await wait_for(partial(s.printed, "ingest: subscribed"), DEADLINE,
                               f"{s.name} to subscribe")
            db = await stack.enter_async_context(_database(url))
            await make_site(db, site)
            payloads = [batch_bytes(site, seq, points_doc(DEVICES, POINTS,
                                                          T0 + timedelta(seconds=seq)))
                        for seq in range(1, BATCHES + 1)]
            with mqtt_client(mqtt_broker) as publisher:
                for payload in payloads + payloads[:REPLAYED]:
                    publisher.publish(topic(site, TopicKind.TELEMETRY), payload, qos=1)
            per_batch = len(DEVICES) * POINTS

            async def all_stored() -> bool:
                return await _counts(db, site) == (BATCHES, BATCHES * per_batch)

            await wait_for(all_stored, DEADLINE, "every batch stored: "
                           + " | ".join(s.output()[-2000:] for s in servers))
            async with httpx.AsyncClient(timeout=DEADLINE) as client:

                async def settled() -> list[dict[str, float]]:
                    seen = [await _outcomes(client, s) for s in servers]
                    total = sum(o.get("stored", 0) + o.get("duplicate", 0) for o in seen)
                    expected = BATCHES + REPLAYED * (1 if mqtt_broker.shared_subscriptions else 2)
                    return seen if total >= expected else []

                outcomes = await wait_for(settled, DEADLINE, "both servers' counters")
        for s in servers:
            assert s.proc.returncode == 0, s.output()
    assert no_failures(outcomes)
    stored = [o.get("stored", 0) for o in outcomes]
    assert sum(stored) == BATCHES  # each batch stored once, by one of the two
    if mqtt_broker.shared_subscriptions:
        assert all(n > 0 for n in stored), f"the broker did not split the load: {outcomes}"
    assert not any(s.printed("Traceback") for s in servers)


def no_failures(outcomes: list[dict[str, float]]) -> bool:
    """Nothing was refused as invalid or errored.

    `unknown_site` is allowed: the broker is shared with tests running in other processes,
    whose sites this database does not hold; their batches reach these servers too.
    """
    return all(set(o) <= {"stored", "duplicate", "unknown_site"} for o in outcomes)


@asynccontextmanager
async def _database(url: str) -> AsyncIterator[Database]:
    db = Database(url)
    try:
        yield db
    finally:
        await db.close()
