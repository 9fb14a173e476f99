"""Commissioning through the API: plans, documents, remote runs against simulated units,
on-site results, the merged report, and the units that join the fleet.

The remote run is driven here by calling the agent's runner directly with the request the
server builds (`service.start_run`) and handing its outcome to `service.record_outcome`: the
same two ends the `commissioning.check` command connects (through the broker and a real agent
in test_commissioning_channel.py).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from pypdf import PdfReader
from sqlmodel import select

from agent.commissioning import CommissioningRunner
from agent.config import DeviceSettings
from protocols.clock import ManualClock
from server.commissioning import service
from server.core.db import Database
from server.models import Unit
from simulators.server import Simulator
from tests.server.test_api_common import World, client_for, seed_world
from tests.support.commissioning_site import (
    INSULATION_LOW_UNIT,
    WRONG_FIRMWARE,
    WRONG_FIRMWARE_UNIT,
    serial_of,
    site,
    targets,
)

API = "/api/v1/commissioning"


@pytest.fixture
async def world(db: Database) -> World:
    return await seed_world(db)


@pytest.fixture
async def staff(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(world.app, world.engineer_token) as client:
        yield client


@pytest.fixture
async def customer(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(world.app, world.own.token) as client:
        yield client


def plan_body(world: World, sim: Simulator, bs: list[int], pv: list[int], *,
              mode: str = "remote", extra_pv: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    pv_serials = [serial_of(sim, n) for n in pv] + list(extra_pv)
    return {
        "site_id": world.own.site_id, "title": "Hafen Nord storage and PV", "mode": mode,
        "visits": 2, "starts_on": "2031-03-20", "ends_on": "2031-03-21",
        "technicians": ["Ana Ruiz", "Li Wei"],
        "equipment": [
            {"series": "EMU-BS", "count": len(bs), "serials": [serial_of(sim, n) for n in bs]},
            {"series": "EMU-PV", "count": len(pv_serials), "serials": pv_serials},
        ],
        "targets": [t.model_dump() for t in targets(sim)],
    }


async def ready_plan(world: World, staff: httpx.AsyncClient, customer: httpx.AsyncClient,
                     body: dict[str, Any]) -> int:
    """Create, issue, acknowledge (as the customer) and schedule a plan; its id."""
    created = await staff.post(f"{API}/plans", json=body)
    assert created.status_code == 201, created.text
    plan = created.json()
    assert plan["state"] == "draft"
    issued = await staff.post(f"{API}/plans/{plan['id']}/issue")
    assert issued.status_code == 200, issued.text
    assert issued.json()["version"] == 1
    ack = await customer.post(f"{API}/plans/{plan['id']}/acknowledge")
    assert ack.status_code == 200, ack.text
    scheduled = await staff.post(f"{API}/plans/{plan['id']}/schedule")
    assert scheduled.status_code == 200, scheduled.text
    return int(plan["id"])


async def remote_run(world: World, db: Database, plan_id: int,
                     devices: Sequence[DeviceSettings] = ()) -> None:
    """The server's request, the agent's runner, the server's recording of the answer."""
    async with db.session() as session:
        run, request = await service.start_run(session, plan_id, actor="eng",
                                               now=world.clock())
    runner = CommissioningRunner(clock=ManualClock(world.clock()),  # the site's clock in sync
                                 devices=devices)
    outcome = await runner.run(request)
    async with db.session() as session:
        await service.record_outcome(session, request.run_id or 0, outcome, now=world.clock())
    assert run.id == request.run_id


def units_by_serial(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["serial"]: u for u in report["units"]}


def failed_checks(unit: dict[str, Any]) -> set[str]:
    return {c["check"] for c in unit["checks"] if not c["passed"]}


async def test_five_units_two_series_flagged_and_passed(
    world: World, db: Database, staff: httpx.AsyncClient, customer: httpx.AsyncClient
) -> None:
    async with site(units=5) as sim:
        plan_id = await ready_plan(world, staff, customer, plan_body(world, sim, [1, 3, 5], [2, 4]))
        await remote_run(world, db, plan_id)
        report = (await customer.get(f"{API}/plans/{plan_id}/report")).json()
        units = units_by_serial(report)
        assert report["summary"] | {"verdict": None} == {
            "planned": 5, "found": 5, "passed": 3, "failed": 2, "incomplete": 0, "missing": 0,
            "unexpected": 0, "verdict": None}
        assert report["summary"]["verdict"] == "fail"
        wrong = units[serial_of(sim, WRONG_FIRMWARE_UNIT)]
        assert failed_checks(wrong) == {"firmware"}
        evidence = next(c for c in wrong["checks"] if c["check"] == "firmware")["evidence"]
        assert evidence == {"running": WRONG_FIRMWARE, "required": "1.0.0"}
        low = units[serial_of(sim, INSULATION_LOW_UNIT)]
        assert failed_checks(low) == {"insulation", "no_active_alarms"}
        riso = next(c for c in low["checks"] if c["check"] == "insulation")["evidence"]
        assert riso["kohm"] == pytest.approx(40.0)
        for n in (1, 4, 5):
            unit = units[serial_of(sim, n)]
            assert unit["status"] == "pass"
            assert {c["check"] for c in unit["checks"]} == {
                "communication", "nameplate", "values_in_range", "no_active_alarms",
                "clock_in_sync", "firmware", "insulation"}
        html = await customer.get(f"{API}/plans/{plan_id}/report", params={"format": "html"})
        assert html.status_code == 200
        assert serial_of(sim, INSULATION_LOW_UNIT) in html.text
        assert "FAIL" in html.text
        pdf = await customer.get(f"{API}/plans/{plan_id}/report", params={"format": "pdf"})
        assert pdf.headers["content-type"] == "application/pdf"
        text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
        assert serial_of(sim, WRONG_FIRMWARE_UNIT) in text
        assert "running 0.9.0, plan requires 1.0.0" in text


async def test_missing_and_unexpected_units(
    world: World, db: Database, staff: httpx.AsyncClient, customer: httpx.AsyncClient
) -> None:
    async with site(units=6) as sim:
        ghost = "EMU-PV50H-999999"
        body = plan_body(world, sim, [1, 3, 5], [2, 4], extra_pv=[ghost])
        plan_id = await ready_plan(world, staff, customer, body)
        await remote_run(world, db, plan_id)
        report = (await staff.get(f"{API}/plans/{plan_id}/report")).json()
        assert [m["serial"] for m in report["missing"]] == [ghost]
        assert [u["serial"] for u in report["unexpected"]] == [serial_of(sim, 6)]
        assert report["unexpected"][0]["series"] == "EMU-PV"
        assert report["summary"]["missing"] == 1
        assert report["summary"]["unexpected"] == 1
        html = (await staff.get(f"{API}/plans/{plan_id}/report",
                                params={"format": "html"})).text
        assert "Missing units" in html
        assert ghost in html
        assert "Unexpected units" in html


async def test_onsite_and_remote_results_in_one_report_and_fleet_registration(
    world: World, db: Database, staff: httpx.AsyncClient, customer: httpx.AsyncClient
) -> None:
    async with site(units=5) as sim:
        plan_id = await ready_plan(world, staff, customer,
                                   plan_body(world, sim, [1, 3, 5], [2, 4], mode="onsite"))
        plan = (await staff.get(f"{API}/plans/{plan_id}")).json()
        onsite_items = {s: [i["name"] for i in items if i["where"] == "onsite"]
                        for s, items in plan["checklist"].items()}
        assert "earthing" in onsite_items["EMU-BS"]
        host, port, unit_id = sim.where(5)
        named = DeviceSettings(name="bs-east", protocol="modbus-tcp", profile="EMU-BS",
                               host=host, port=port, unit_id=unit_id)
        await remote_run(world, db, plan_id, devices=[named])
        before = units_by_serial((await staff.get(f"{API}/plans/{plan_id}/report")).json())
        assert before[serial_of(sim, 1)]["status"] == "incomplete"
        assert "earthing" in before[serial_of(sim, 1)]["pending"]
        results = []
        for n in range(1, 6):
            series = sim.unit(n).profile.series
            for check in onsite_items[series]:
                passed = not (n == 4 and check == "dc_polarity")
                results.append({"serial": serial_of(sim, n), "series": series, "check": check,
                                "passed": passed, "detail": "ok" if passed else "reversed",
                                "evidence": {"photo": f"IMG_{n}_{check}.jpg"}})
        recorded = await staff.post(f"{API}/plans/{plan_id}/results", json={"results": results})
        assert recorded.status_code == 201, recorded.text
        report = (await customer.get(f"{API}/plans/{plan_id}/report")).json()
        units = units_by_serial(report)
        first = units[serial_of(sim, 1)]
        assert first["status"] == "pass"
        assert {c["source"] for c in first["checks"]} == {"remote", "onsite"}
        earthing = next(c for c in first["checks"] if c["check"] == "earthing")
        assert earthing["recorded_by"].startswith("eng-")
        assert failed_checks(units[serial_of(sim, 4)]) == {"dc_polarity"}
        assert report["summary"]["passed"] == 2  # 1 and 5; 2, 3 and 4 fail
        docs = (await staff.get(f"{API}/plans/{plan_id}/documents")).json()
        assert [d["version"] for d in docs if d["kind"] == "report"] == [1, 2]
        done = await staff.post(f"{API}/plans/{plan_id}/complete")
        assert done.status_code == 200, done.text
        async with db.session() as session:
            fleet = (await session.exec(
                select(Unit).where(Unit.site_id == world.own.site_id))).all()
        registered = {u.serial: u for u in fleet if u.serial and u.serial.startswith("EMU-")}
        assert set(registered) == {serial_of(sim, 1), serial_of(sim, 5)}
        unit = registered[serial_of(sim, 5)]
        assert (unit.device, unit.series, unit.model, unit.firmware) == (
            "bs-east", "EMU-BS", "EMU-BS100", "1.0.0")  # the agent's name for its address
        assert registered[serial_of(sim, 1)].device == serial_of(sim, 1)


async def test_plan_document_versions_scoping_and_roles(
    world: World, staff: httpx.AsyncClient, customer: httpx.AsyncClient
) -> None:
    async with site(units=3) as sim:
        body = plan_body(world, sim, [1], [2])
    created = (await staff.post(f"{API}/plans", json=body)).json()
    plan_id = created["id"]
    assert created["number"] == f"CP-{plan_id:04d}"
    assert [i["name"] for i in created["checklist"]["EMU-BS"]][:2] == [
        "communication", "nameplate"]
    assert (await customer.post(f"{API}/plans", json=body)).status_code == 403
    assert (await customer.post(f"{API}/plans/{plan_id}/acknowledge")).status_code == 409
    assert (await staff.post(f"{API}/plans/{plan_id}/schedule")).status_code == 409
    await staff.post(f"{API}/plans/{plan_id}/issue")
    assert (await staff.post(f"{API}/plans/{plan_id}/acknowledge")).status_code == 403
    assert (await staff.post(f"{API}/plans/{plan_id}/schedule")).status_code == 409
    changed = await staff.patch(f"{API}/plans/{plan_id}", json={"visits": 3})
    assert changed.json()["state"] == "draft"
    second = await staff.post(f"{API}/plans/{plan_id}/issue")
    assert second.json()["version"] == 2
    pdf = await customer.get(f"{API}/plans/{plan_id}/document", params={"format": "pdf"})
    assert pdf.content.startswith(b"%PDF")
    first = await customer.get(f"{API}/plans/{plan_id}/document", params={"version": 1})
    assert "Service visits</th><td>2" in first.text.replace("\n", "")
    assert "Ana Ruiz, Li Wei" in first.text
    async with client_for(world.app, world.other.token) as stranger:
        assert (await stranger.get(f"{API}/plans/{plan_id}")).status_code == 404
        assert (await stranger.get(f"{API}/plans/{plan_id}/report")).status_code == 404
        listed = (await stranger.get(f"{API}/plans")).json()
        assert plan_id not in [p["id"] for p in listed["data"]]
    listed = (await customer.get(f"{API}/plans")).json()
    assert plan_id in [p["id"] for p in listed["data"]]
    bad = dict(body, equipment=[{"series": "EMU-XX", "count": 1}])
    refused = await staff.post(f"{API}/plans", json=bad)
    assert refused.status_code == 422
    assert "EMU-XX" in refused.json()["detail"]
    unscheduled = await staff.post(f"{API}/plans/{plan_id}/runs")
    assert unscheduled.status_code == 409
    assert "schedule it before running" in unscheduled.json()["detail"]


async def test_plan_with_a_ticket_is_linked_and_noted_on_its_timeline(
    world: World, db: Database, staff: httpx.AsyncClient, customer: httpx.AsyncClient
) -> None:
    from server.tickets import service as tickets
    from server.tickets.models import TicketEvent, TicketLink

    async with db.session() as session:
        ticket = await tickets.open_ticket(session, site_id=world.own.site_id, source="portal",
                                           title="Commission the new storage", now=world.clock())
    async with site(units=3) as sim:
        body = plan_body(world, sim, [1], [2]) | {"ticket_id": ticket.id}
    plan_id = await ready_plan(world, staff, customer, body)
    async with db.session() as session:
        links = (await session.exec(select(TicketLink).where(
            TicketLink.ticket_id == ticket.id))).all()
        events = (await session.exec(select(TicketEvent).where(
            TicketEvent.ticket_id == ticket.id, TicketEvent.kind == "commissioning"))).all()
    assert [(link.kind, link.ref) for link in links] == [("commissioning", str(plan_id))]
    assert [e.detail["move"] for e in events] == [
        "issued (version 1)", "acknowledged by the customer", "scheduled"]
    elsewhere = body | {"site_id": world.other.site_id}
    refused = await staff.post(f"{API}/plans", json=elsewhere)
    assert refused.status_code == 422
    assert "is not of site" in refused.json()["detail"]


async def test_agent_answers_progress_error_and_expiry_mark_the_run(
    world: World, db: Database, staff: httpx.AsyncClient, customer: httpx.AsyncClient
) -> None:
    import uuid
    from types import SimpleNamespace

    from protocols.clock import ManualClock as Clock
    from protocols.messages import AckResult, CommandAck
    from server.commands.models import CommandRecord
    from server.commissioning import channel
    from server.commissioning.models import CommissioningRun

    async with site(units=3) as sim:
        plan_id = await ready_plan(world, staff, customer, plan_body(world, sim, [1], [2]))
    commands: Any = SimpleNamespace(clock=Clock(world.clock()))
    ids = []
    for _ in range(2):
        command_id = uuid.uuid4()
        async with db.session() as session:
            run, _request = await service.start_run(session, plan_id, actor="eng",
                                                    now=world.clock())
            run.command_id = str(command_id)
            session.add(run)
        ids.append((run.id, command_id))
    (failing, failing_cmd), (stale, stale_cmd) = ids

    def ack(command_id: uuid.UUID, result: AckResult, **detail: Any) -> CommandAck:
        return CommandAck(command_id=command_id, agent="a", ts=world.clock(), result=result,
                          detail=detail)

    def record(command_id: uuid.UUID) -> CommandRecord:
        return CommandRecord(id=str(command_id), site_id=world.own.site_id, kind="x",
                             payload="", issued_at=world.clock(), expires_at=world.clock())

    async with db.session() as session:
        await channel.on_answer(commands, session, record(failing_cmd),
                                ack(failing_cmd, AckResult.PROGRESS, probed=10, of=20))
    async with db.session() as session:
        running = await session.get(CommissioningRun, failing)
        assert running is not None
        assert running.progress == {"probed": 10, "of": 20}
        await channel.on_answer(commands, session, record(failing_cmd),
                                ack(failing_cmd, AckResult.REJECTED, error="bad targets"))
        await channel.on_expired(commands, session, record(stale_cmd))
    async with db.session() as session:
        first = await session.get(CommissioningRun, failing)
        second = await session.get(CommissioningRun, stale)
    assert first is not None
    assert second is not None
    assert (first.state, first.error) == ("failed", "bad targets")
    assert (second.state, second.error) == ("failed", "the agent did not answer in time")
    runs = (await staff.get(f"{API}/plans/{plan_id}/runs")).json()
    assert [r["state"] for r in runs] == ["failed", "failed"]
