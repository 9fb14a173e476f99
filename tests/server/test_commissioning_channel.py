"""Remote commissioning end to end: the API sends `commissioning.check` over the broker, the
real agent probes simulated units and answers, ingest hands the answer to the commissioning
service, and the report shows the failures, the missing and the unexpected unit."""

from __future__ import annotations

import secrets

import httpx
import pytest
from sqlmodel import select

from agent.service import Agent
from server.commissioning import service
from server.commissioning.models import CommissioningRun
from server.core.security import hash_token
from server.models import ApiToken, Site, User
from simulators.server import Simulator
from tests.server.test_commands_e2e import Stack, stack  # noqa: F401 - the fixture
from tests.support.commissioning_site import (
    INSULATION_LOW_UNIT,
    WRONG_FIRMWARE_UNIT,
    serial_of,
    site,
    targets,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


async def plan_for(st: Stack, sim: Simulator) -> int:
    """A scheduled remote plan: units 1..5 and one more PV that is not there (unit 6 is on
    site but not planned)."""
    async with st.proc.db.session() as s:
        site_row = (await s.exec(select(Site).where(Site.code == st.site))).one()
        now = st.proc.clock.now()
        plan = await service.create_plan(
            s, site_id=site_row.id or 0, actor="lead", now=now, title="Remote check",
            mode="remote", technicians=["Ana Ruiz"],
            equipment=[
                {"series": "EMU-BS", "count": 3, "serials": [serial_of(sim, n) for n in (1, 3, 5)]},
                {"series": "EMU-PV", "count": 3,
                 "serials": [serial_of(sim, 2), serial_of(sim, 4), "EMU-PV50H-999999"]},
            ],
            targets=[t.model_dump() for t in targets(sim)])
        plan_id = plan.id or 0
        await service.issue_plan(s, plan_id, actor="lead", now=now)
        await service.acknowledge_plan(s, plan_id, actor="customer", now=now)
        await service.transition(s, plan_id, "scheduled", actor="lead", now=now)
    return plan_id


async def engineer_token(st: Stack) -> str:
    token = secrets.token_urlsafe(24)
    async with st.proc.db.session() as s:
        user = User(name=f"eng-{st.site}", role="engineer")
        s.add(user)
        await s.flush()
        s.add(ApiToken(user_id=user.id or 0, token_hash=hash_token(token)))
    return token


async def test_remote_run_through_the_agent(stack: Stack) -> None:  # noqa: F811 - fixture
    agent: Agent = stack.agent()
    async with site(units=6) as sim:
        plan_id = await plan_for(stack, sim)
        token = await engineer_token(stack)
        await agent.start()
        try:
            await wait_for(lambda: agent.uplink.stats.connected, 20, "the agent to connect")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{stack.proc.api_port}/api/v1/commissioning",
                headers={"Authorization": f"Bearer {token}"},
            ) as api:
                started = await api.post(f"/plans/{plan_id}/runs")
                assert started.status_code == 202, started.text
                run_id = started.json()["id"]
                assert started.json()["command_id"]

                async def finished() -> CommissioningRun | None:
                    async with stack.proc.db.session() as s:
                        run = await s.get(CommissioningRun, run_id)
                    return run if run is not None and run.state in ("done", "failed") else None

                run = await wait_for(finished, 60, "the agent's answer to become a report")
                assert run is not None
                assert run.state == "done", run.error
                report = (await api.get(f"/plans/{plan_id}/report")).json()
        finally:
            await agent.stop()
    units = {u["serial"]: u for u in report["units"]}
    failed = {s: {c["check"] for c in u["checks"] if not c["passed"]} for s, u in units.items()}
    assert failed[serial_of(sim, WRONG_FIRMWARE_UNIT)] == {"firmware"}
    assert failed[serial_of(sim, INSULATION_LOW_UNIT)] == {"insulation", "no_active_alarms"}
    for n in (1, 4, 5):
        assert units[serial_of(sim, n)]["status"] == "pass"
    clock = next(c for c in units[serial_of(sim, 1)]["checks"] if c["check"] == "clock_in_sync")
    assert abs(clock["evidence"]["skew_s"]) < 5
    assert [m["serial"] for m in report["missing"]] == ["EMU-PV50H-999999"]
    assert [u["serial"] for u in report["unexpected"]] == [serial_of(sim, 6)]
    assert report["remote_run"]["run_id"] == run_id
    assert run.progress == {} or run.progress.get("of") == 8
