"""Dashboard: the open-faults page with 1,000 open faults renders in under 1 s on the server.

Each fault opened an A ticket with its SLA clocks (as the fault engine does), so the page
does all it does in production: the faults with their site and unit, the linked tickets and
their clocks, the countdowns. The baseline, measured in the same run on the same database, is
the JSON API's list of the same 1,000 faults (`GET /api/v1/faults?state=open&limit=1000`):
the ratio says what the HTML page costs on top of just reading the rows. Timed in process
(ASGI, no socket), page and API requested in turn, medians after a warm-up, on SQLite
and PostgreSQL.

    pytest -m bench tests/bench/test_dashboard.py -s
"""

from __future__ import annotations

import secrets
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.core.config import ServerSettings
from server.core.db import Database
from server.core.passwords import set_password
from server.core.security import hash_token, new_token
from server.models import ApiToken, Fault, Organisation, Site, Unit, User
from server.tickets import service
from tests.bench.server_db import scratch_pg, scratch_sqlite
from tests.server.web.helpers import PASSWORD, log_in

pytestmark = pytest.mark.bench

FAULTS = 1000
UNITS = 100
RUNS = 7
GOAL_S = 1.0
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


async def _seed(db: Database) -> str:
    """1,000 open faults (100 units x 10 codes), each with an A ticket; the engineer's token."""
    async with db.session() as s:
        org = Organisation(name=f"bench-{secrets.token_hex(3)}")
        s.add(org)
        await s.flush()
        site = Site(code=f"bench-{secrets.token_hex(3)}", name="Bench site", org_id=org.id or 0,
                    timezone="Europe/Berlin")
        s.add(site)
        await s.flush()
        units = [Unit(site_id=site.id or 0, device=f"emu-{i}", series="EMU-BS")
                 for i in range(UNITS)]
        s.add_all(units)
        await s.flush()
        for n in range(FAULTS):
            unit = units[n % UNITS]
            at = NOW - timedelta(seconds=n * 7)
            fault = Fault(site_id=site.id or 0, unit_id=unit.id or 0, code=f"code-{n // UNITS}",
                          fault_class="A", title=f"Unit tripped ({n})", opened_at=at,
                          last_seen_at=at, evidence={"n": n})
            s.add(fault)
            await s.flush()
            ticket = await service.open_ticket(s, site_id=site.id or 0, source="fault",
                                               title=fault.title, fault_class="A", now=at)
            await service.link(s, ticket.id or 0, "fault", str(fault.id), now=at)
        user = User(name=f"bench-eng-{secrets.token_hex(3)}", role="engineer")
        s.add(user)
        await s.flush()
        await set_password(s, user, PASSWORD)
        token = new_token()
        s.add(ApiToken(user_id=user.id or 0, token_hash=hash_token(token)))
    return f"{user.name}\n{token}"


async def _alternating(client: httpx.AsyncClient, token: str) -> tuple[float, float]:
    """Medians of the page and of the JSON list, requested in turn round by round."""
    api = "/api/v1/faults?state=open&limit=1000"
    auth = {"Authorization": f"Bearer {token}"}
    await client.get("/faults")  # warm-up (templates compiled, caches filled)
    await client.get(api, headers=auth)
    page_s: list[float] = []
    json_s: list[float] = []
    for _ in range(RUNS):
        for url, headers, times in (("/faults", {}, page_s), (api, auth, json_s)):
            t0 = time.perf_counter()
            r = await client.get(url, headers=headers)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200
    return statistics.median(page_s), statistics.median(json_s)


async def measure(url: str, label: str) -> float:
    db = Database(url)
    try:
        name, token = (await _seed(db)).split("\n")
        settings = ServerSettings(database_url=url, secret_key=secrets.token_hex(16),
                                  roles=("api",))
        app = create_app(settings, db, clock=lambda: NOW)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await log_in(client, name)
            page = await client.get("/faults")
            assert page.text.count("data-fault=") == FAULTS
            assert page.text.count("sla sla-") >= FAULTS
            html_s, json_s = await _alternating(client, token)
    finally:
        await db.close()
    ratio = html_s / json_s
    print(f"\n[{label}] open-faults page with {FAULTS} faults + tickets + clocks: "
          f"{html_s * 1000:.0f} ms (median of {RUNS}); JSON API list of the same faults: "
          f"{json_s * 1000:.0f} ms; page/API ratio {ratio:.2f}; goal < {GOAL_S:.1f} s: "
          f"{'met' if html_s < GOAL_S else 'NOT met'}")
    assert ratio > 0  # benchmarks check sanity, not speed (docs/benchmarks.md)
    return ratio


async def test_faults_page_1000_sqlite(tmp_path: Path) -> None:
    with scratch_sqlite(tmp_path) as url:
        await measure(url, "SQLite")


async def test_faults_page_1000_postgresql() -> None:
    with scratch_pg() as url:
        await measure(url, "PostgreSQL")
