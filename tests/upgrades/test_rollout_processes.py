"""Two server processes' schedulers drive one rollout on one PostgreSQL: each step once.

Two `ServerProcess`es (scheduler role, each with its own `Database` pool and its own
`CommandService`) tick every 50 ms on the same database and a shared `ManualClock`, while the
test plays the agents: every dispatched unit answers `ok`, so the plan walks through its
canary and two waves. Each unit must get exactly one `upgrade.job` row in the `command`
table, whose id is the one its `RolloutTarget` keeps, and each process's engine must have
sent each unit at most once between them (no wave step taken twice, even in a transaction
that was rolled back).

SQLite has no row locks (`FOR UPDATE SKIP LOCKED` is a no-op there), and several server
processes need PostgreSQL (deploy/SCALING.md), so the test runs only on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from protocols.clock import ManualClock
from protocols.messages import CommandKind
from protocols.signing import Ed25519PrivateKey
from server.commands.keys import load_or_create_key
from server.commands.models import CommandRecord
from server.core.config import MqttSettings, ServerSettings
from server.main import ServerProcess
from server.models import Site, Unit
from server.upgrades.models import RolloutTarget
from server.upgrades.rollout import RolloutEngine
from tests.support.broker import BrokerInfo
from tests.support.waiting import wait_for
from tests.upgrades.world import Api, firmware, fixes, signed, upload

DAY = "2031-06-02"
SITES, UNITS = 4, 4


async def _site(api: Api, units: int) -> int:
    """A site row with `units` EMU-BS units at 1.0.0 (no agent: the test answers for it)."""
    async with api.db.session() as s:
        code = f"two-{secrets.token_hex(3)}"
        site = Site(code=code, name=code, org_id=api.org_id, timezone="UTC")
        s.add(site)
        await s.flush()
        assert site.id is not None
        for n in range(1, units + 1):
            s.add(Unit(site_id=site.id, device=f"bs-{n}", series="EMU-BS", model="EMU-BS100",
                       firmware="1.0.0"))
        return site.id


@asynccontextmanager
async def _scheduler(settings: ServerSettings, clock: ManualClock, name: str,
                     sent: list[tuple[str, int]]) -> AsyncIterator[ServerProcess]:
    """A scheduler-only server process whose rollout engine notes each unit it sends."""
    proc = ServerProcess(settings, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(proc.run(stop))
    try:
        await wait_for(lambda: proc.sla is not None and proc.sla.ticks >= 1, 20,
                       f"{name}'s first scheduler tick")
        send = proc.rollouts.send

        async def noting(session: Any, site: Site, args: dict[str, Any], ttl: float) -> str:
            sent.append((name, int(args["target_id"])))
            return str(await send(session, site, args, ttl))

        proc.rollouts.send = noting
        yield proc
    finally:
        stop.set()
        await wait_for(task, 20, f"{name} to stop")


async def _ticks_after(proc: ServerProcess) -> None:
    """Wait until the scheduler has run two more full ticks."""
    seen = proc.sla.ticks
    await wait_for(lambda: proc.sla.ticks >= seen + 2, 20, "two scheduler ticks")


async def test_two_schedulers_dispatch_each_unit_once(
        api: Api, upgrades_db_url: str, mqtt_broker: BrokerInfo, release_key: Ed25519PrivateKey,
        clock: ManualClock, tmp_path: Path) -> None:
    if not upgrades_db_url.startswith("postgresql"):
        pytest.skip("several server processes need PostgreSQL: SQLite has no row locks "
                    "(set EMU_TEST_DATABASE_URL)")
    for pkg in (signed(firmware("1.0.0"), release_key),
                signed(firmware("1.1.0", change=40), release_key, fixes=fixes("derating"))):
        resp = await upload(api, pkg)
        assert resp.status_code == 201, resp.text
    release_id = resp.json()["id"]
    site_ids = [await _site(api, UNITS) for _ in range(SITES)]
    body = {"title": "EMU-BS 1.1.0 on two schedulers", "release_id": release_id,
            "site_ids": site_ids,
            "windows": [{"start": f"{DAY}T10:00", "end": f"{DAY}T18:00"}],
            "canary": 1, "wave_percentages": [50, 100], "concurrency_per_site": 2,
            "concurrency_total": 3, "settle_s": 0.2, "personnel_required": "one electrician"}
    async with api.client() as admin, api.client("customer") as customer:
        r = await admin.post("/plans", json=body)
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        for call in (admin.post(f"/plans/{pid}/issue"),
                     customer.post(f"/plans/{pid}/confirm", json={
                         "window": 0, "personnel": ["Li Wei"], "signature": "Zhang San"}),
                     admin.post(f"/plans/{pid}/schedule")):
            r = await call
            assert r.status_code == 200, r.text

    settings = ServerSettings(
        database_url=upgrades_db_url, roles=("scheduler",), scheduler_tick_s=0.05,
        migrate_on_start=False, data_dir=tmp_path,
        mqtt=MqttSettings(url=mqtt_broker.url, client_id=None))
    load_or_create_key(settings.command_key_path)  # one key for both, made before they race
    sent: list[tuple[str, int]] = []
    answers = RolloutEngine(api.settings, api.db, _no_send, clock=clock)  # the agents' side
    async with AsyncExitStack() as stack:
        procs = [await stack.enter_async_context(_scheduler(settings, clock, name, sent))
                 for name in ("one", "two")]
        clock.advance((datetime.fromisoformat(f"{DAY}T12:00:00+00:00")
                       - clock.now()).total_seconds())  # inside every site's window

        async def answer_all() -> bool:
            async with api.db.session() as s:
                rows = (await s.exec(select(RolloutTarget).where(
                    RolloutTarget.plan_id == pid))).all()
                busy = [t.command_id for t in rows if t.state == "dispatched"]
            for command_id in busy:  # each unit installs and answers ok
                assert command_id is not None
                async with api.db.session() as s:
                    await answers.on_result(s, command_id, "ok", {"version": "1.1.0"})
            async with api.client() as admin:
                return (await admin.get(f"/plans/{pid}")).json()["state"] != "running" \
                    and all(t.state != "pending" for t in rows)

        await wait_for(answer_all, 90, "the rollout to finish")
        for proc in procs:  # both saw the finished plan; nothing more may be sent
            await _ticks_after(proc)

    async with api.client() as admin:
        plan = (await admin.get(f"/plans/{pid}")).json()
    assert plan["state"] == "completed", plan
    assert plan["counts"] == {"succeeded": SITES * UNITS}
    async with api.db.session() as s:
        targets = (await s.exec(select(RolloutTarget).where(
            RolloutTarget.plan_id == pid))).all()
        commands = (await s.exec(select(CommandRecord).where(
            CommandRecord.kind == CommandKind.UPGRADE_JOB.value,
            col(CommandRecord.site_id).in_(site_ids)))).all()
    assert len(targets) == SITES * UNITS
    assert {t.wave for t in targets} == {0, 1, 2}
    per_target = Counter(c.args["target_id"] for c in commands)
    assert set(per_target.values()) == {1}, per_target  # one upgrade.job row per unit
    assert {str(t.id) for t in targets} == {str(k) for k in per_target}
    assert {t.command_id for t in targets} == {c.id for c in commands}
    sends = Counter(target for _, target in sent)
    assert len(sent) == SITES * UNITS, sent  # no wave step taken twice
    assert set(sends.values()) == {1}, sent
    print("sends per process:", Counter(name for name, _ in sent))


async def _no_send(*_: Any) -> str:  # pragma: no cover - the agents' side never sends
    raise AssertionError("the answering engine does not dispatch")
