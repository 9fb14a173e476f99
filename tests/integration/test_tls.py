"""TLS end to end: the real agent through Mosquitto with client certificates, and HTTPS.

A CA, the broker's certificate and client certificates are made at test time
(tests/support/tls.py). A private Mosquitto runs deploy/mosquitto/mtls.conf (paths and ports
swapped): TLS with `require_certificate` and `use_identity_as_username`, so the certificate's
common name is the broker user and deploy/mosquitto/acl applies to it. The agent runs as a
process (`python -m emu agent -c agent.toml`) polling a simulated unit; the server's ingest
connects with its own certificate (CN `emu-server`), and the agent's telemetry must end up
in the database. Clients without a certificate, or with one from another CA, get nowhere.
`emu server` with `http.tls_cert_file` serves its API over HTTPS (checked against the CA).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from server.broker_auth import SERVER_USERNAME, PasswordEntry, hash_password, write_password_file
from server.core.config import MqttSettings, ServerSettings
from server.core.db import Database, migrate_sync
from server.enrolment import new_password
from server.main import ServerProcess
from simulators.server import SimConfig, Simulator
from tests.agent.agent_harness import (
    agent_config,
    sim_device,
    start_agent_process,
    stop_agent_process,
    unique_site,
    write_config,
)
from tests.bench.server_data import make_site
from tests.support import mosquitto
from tests.support.database import fresh_database
from tests.support.net import LOOPBACK
from tests.support.process import read_until
from tests.support.tls import TestCA, mqtt_verdict
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MTLS_CONF = REPO / "deploy/mosquitto/mtls.conf"
ACL = REPO / "deploy/mosquitto/acl"
DEADLINE = 30.0


@dataclass
class TlsBroker:
    """The private broker and the CA behind it."""

    broker: mosquitto.Mosquitto
    ca: TestCA
    tmp: Path

    @property
    def url(self) -> str:
        """The agents' listener."""
        return f"mqtts://{LOOPBACK}:{self.broker.port('8883')}"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """Mosquitto running deploy/mosquitto/mtls.conf with a fresh CA."""
    if mosquitto.MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian package `mosquitto`)")
    tmp = tmp_path_factory.mktemp("mtls")
    ca = TestCA(tmp)
    server = ca.server("broker")
    passwd = tmp / "passwd"
    write_password_file(passwd, [PasswordEntry(SERVER_USERNAME, hash_password(new_password()))])
    files = {"password_file": passwd, "acl_file": ACL, "cafile": ca.cert,
             "certfile": server.cert, "keyfile": server.key}
    with mosquitto.running(MTLS_CONF, tmp, files) as broker:
        yield TlsBroker(broker, ca, tmp)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """One simulated unit."""
    async with Simulator(SimConfig(units=1, port=0, refresh_s=0.05)) as s:
        yield s


async def _stored_batches(db: Database, agent: str) -> int:
    async with db.session() as session:
        conn = await session.connection()
        result = await conn.execute(
            sa.text("SELECT count(*) FROM ingestedbatch WHERE agent = :a AND stream = 'telemetry'"),
            {"a": agent})
        return int(result.scalar_one())


async def test_agent_telemetry_reaches_the_server_over_mutual_tls(
    tls_broker: TlsBroker, sim: Simulator, database_url: str, tmp_path: Path
) -> None:
    site = unique_site("mtls")
    agent_cert = tls_broker.ca.client(site)
    ingest_cert = tls_broker.ca.client(SERVER_USERNAME)
    config = write_config(tmp_path / "agent.toml", agent_config(
        site=site, broker_url=tls_broker.url, protocol="auto", state_dir=tmp_path,
        devices=[sim_device(sim, 1, poll_interval_s=0.5)],
        broker={"ca_file": str(tls_broker.ca.cert), "cert_file": str(agent_cert.cert),
                "key_file": str(agent_cert.key)}))
    log = tmp_path / "agent.log"
    with fresh_database(database_url, tmp_path) as url:
        migrate_sync(url)
        settings = ServerSettings(
            database_url=url, roles=("ingest",), migrate_on_start=False,
            mqtt=MqttSettings(url=tls_broker.url, ca_file=tls_broker.ca.cert,
                              cert_file=ingest_cert.cert, key_file=ingest_cert.key,
                              shared_group=f"emu-tls-{uuid.uuid4().hex[:8]}"),
        )
        proc = ServerProcess(settings)
        db = Database(url)
        await make_site(db, site)
        stop = asyncio.Event()
        runner = asyncio.create_task(proc.run(stop))
        agent = None
        try:
            await wait_for(lambda: proc.ingest is not None and proc.ingest.ready.is_set(),
                           DEADLINE, f"the ingest worker to subscribe over TLS "
                           f"({proc.ingest and proc.ingest.stats.last_error})")
            agent = await start_agent_process(config, log)
            await wait_for(lambda: _stored_batches(db, site), DEADLINE,
                           f"the agent's telemetry in the database (agent log: {log}; broker "
                           f"log: {tls_broker.broker.log})")
        finally:
            code = await stop_agent_process(agent) if agent is not None else 0
            stop.set()
            await runner
            await db.close()
    assert code == 0, log.read_text()
    assert proc.ingest.stats.invalid == 0
    assert f"New client connected from {LOOPBACK}" in tls_broker.broker.log_text()
    assert f"u'{site}'" in tls_broker.broker.log_text()  # logged in as its certificate's CN


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_clients_without_a_valid_certificate_are_refused(
    tls_broker: TlsBroker, tmp_path: Path, who: str
) -> None:
    cert = None if who == "no certificate" else TestCA(tmp_path, "rogue CA").client("site-a")
    outcome = mqtt_verdict(tls_broker.broker.port("8883"), tls_broker.ca.cert, cert)
    assert outcome != "connected", f"a client with {who} got in"


def test_a_certificate_of_the_ca_is_let_in(tls_broker: TlsBroker) -> None:
    cert = tls_broker.ca.client("site-a")
    assert mqtt_verdict(tls_broker.broker.port("8883"), tls_broker.ca.cert, cert) \
        == "connected"


async def test_emu_server_serves_https_when_configured(tmp_path: Path, database_url: str) -> None:
    ca = TestCA(tmp_path)
    cert = ca.server()
    token = new_password()
    with fresh_database(database_url, tmp_path) as url:
        (tmp_path / "server.toml").write_text(
            f'database_url = "{url}"\nroles = ["api"]\nsecret_key = "{new_password()}"\n'
            f'admin_token = "{token}"\n'
            f'[http]\nhost = "{LOOPBACK}"\nport = 0\n'
            f'tls_cert_file = "{cert.cert}"\ntls_key_file = "{cert.key}"\n', encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "emu", "server", "-c", str(tmp_path / "server.toml"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, cwd=tmp_path)
        try:
            assert proc.stdout is not None
            banner = await read_until(proc.stdout, "roles", DEADLINE, "the server's banner")
            base = next(w for w in banner.split() if w.startswith("https://"))
            base = base.removesuffix("/api/v1/")
            trust = ssl.create_default_context(cafile=str(ca.cert))
            async with httpx.AsyncClient(verify=trust, timeout=DEADLINE) as client:
                health = await client.get(f"{base}/healthz")
                me = await client.get(f"{base}/api/v1/users/me",
                                      headers={"Authorization": f"Bearer {token}"})
            with pytest.raises(httpx.HTTPError):  # and no plain HTTP on that port
                async with httpx.AsyncClient(timeout=DEADLINE) as client:
                    await client.get(base.replace("https://", "http://") + "/healthz")
        finally:
            proc.terminate()
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.read()
    assert health.status_code == 200, health.text
    assert me.status_code == 200, me.text
