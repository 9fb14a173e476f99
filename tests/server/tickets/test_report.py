"""The monthly SLA report for a seeded month, against figures worked out by hand, over the
service, the API (JSON and CSV) and `emu sla report`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import typer
import uvicorn
from typer.testing import CliRunner

from server.app import create_app
from server.cli_verbs import register
from server.core.db import Database
from server.sla.engine import SlaEngine
from server.sla.report import report_csv, sla_report
from server.tickets import service
from tests.server.test_api_common import add_user, settings_for
from tests.server.tickets.conftest import MakeSite, pk
from tests.support.waiting import wait_for

NOV = datetime(2026, 11, 1, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """A UTC instant in November 2026."""
    return NOV.replace(day=day, hour=hour, minute=minute)


async def _seed(db: Database, make_site: MakeSite) -> dict[str, int]:
    """Alpha: T1 (A, all in time), T2 (A, response and processing late), T3 (C, awaiting a
    release); Beta: T4 (B, processing late), T5 (B, opened in October), T6 (upgrade request)."""
    alpha = await make_site(org_name="Alpha Storage")
    beta = await make_site(org_name="Beta Solar")
    engine = SlaEngine(db)
    ids: dict[str, int] = {"beta": beta.org_id}
    async with db.session() as s:
        t1 = await service.open_ticket(s, site_id=alpha.id, source="fault", title="T1",
                                       fault_class="A", now=at(3, 10))
        ids["T1"] = pk(t1)
        await service.transition(s, pk(t1), "acknowledged", now=at(3, 10, 2))
        await service.set_diagnosis(s, pk(t1), diagnosis="d", proposed_solution="p",
                                    now=at(3, 10, 10))
        await service.transition(s, pk(t1), "resolved", now=at(3, 10, 40))
        t2 = await service.open_ticket(s, site_id=alpha.id, source="fault", title="T2",
                                       fault_class="A", now=at(10, 0))
        ids["T2"] = pk(t2)
    await engine.tick(at(10, 0, 6))  # response breached at 00:05
    async with db.session() as s:
        await service.transition(s, ids["T2"], "acknowledged", now=at(10, 0, 8))
    await engine.tick(at(10, 0, 16))  # processing breached at 00:15
    async with db.session() as s:
        await service.record(s, ids["T2"], "breach_cause", "waiting for spare part K3",
                             detail={"clock": "processing"}, now=at(10, 0, 30))
        await service.set_diagnosis(s, ids["T2"], diagnosis="d", proposed_solution="p",
                                    now=at(10, 0, 20))
        await service.transition(s, ids["T2"], "resolved", now=at(10, 0, 50))
        t3 = await service.open_ticket(s, site_id=alpha.id, source="fault", title="T3",
                                       fault_class="C", now=at(12, 9))
        ids["T3"] = pk(t3)
        await service.transition(s, pk(t3), "acknowledged", now=at(12, 9, 1))
        await service.set_diagnosis(s, pk(t3), diagnosis="d", proposed_solution="p",
                                    now=at(12, 9, 30))
        await service.transition(s, pk(t3), "awaiting_release", now=at(12, 9, 31))
        t4 = await service.open_ticket(s, site_id=beta.id, source="phone", title="T4",
                                       fault_class="B", now=at(20, 12))
        ids["T4"] = pk(t4)
        await service.transition(s, pk(t4), "acknowledged", now=at(20, 12, 3))
        t5 = await service.open_ticket(s, site_id=beta.id, source="phone", title="T5",
                                       fault_class="B", now=datetime(2026, 10, 31, 23, tzinfo=UTC))
        ids["T5"] = pk(t5)
        t6 = await service.open_ticket(s, site_id=beta.id, source="upgrade_request",
                                       title="T6", now=at(5, 9))
        ids["T6"] = pk(t6)
    await engine.tick(at(20, 12, 31))  # T4 processing breached at 12:30
    async with db.session() as s:
        await service.transition(s, ids["T4"], "resolved", now=at(20, 13, 30))
    await engine.close()
    return ids


EXPECTED_ROWS = [
    # customer, class, tickets, met, breached, compliance %, MTTA s, MTTR s
    ("Alpha Storage", "A", 2, 4, 2, 66.67, (120 + 480) / 2, (2400 + 3000) / 2),
    ("Alpha Storage", "C", 1, 2, 0, 100.0, 60.0, None),
    ("Beta Solar", "B", 1, 2, 1, 66.67, 180.0, 5400.0),
    ("Beta Solar", "upgrade", 1, 0, 0, None, None, None),
    ("*", "A", 2, 4, 2, 66.67, 300.0, 2700.0),
    ("*", "B", 1, 2, 1, 66.67, 180.0, 5400.0),
    ("*", "C", 1, 2, 0, 100.0, 60.0, None),
    ("*", "upgrade", 1, 0, 0, None, None, None),
]


@pytest.fixture
async def seeded(own_db: Database, own_site: MakeSite) -> dict[str, int]:
    """The seeded month in a database of its own (the report covers every customer)."""
    return await _seed(own_db, own_site)


async def test_report_matches_figures_worked_out_by_hand(
        own_db: Database, seeded: dict[str, int]) -> None:
    async with own_db.session() as s:
        report = await sla_report(s, "2026-11")
    assert [(r.customer, r.fault_class, r.tickets, r.clocks_met, r.clocks_breached,
             r.compliance_pct, r.mtta_s, r.mttr_s) for r in report.rows] == EXPECTED_ROWS
    assert [(b.ticket_id, b.customer, b.clock, b.due_at, b.cause) for b in report.breaches] == [
        (seeded["T2"], "Alpha Storage", "response", at(10, 0, 5).isoformat(),
         "not acknowledged"),
        (seeded["T2"], "Alpha Storage", "processing", at(10, 0, 15).isoformat(),
         "waiting for spare part K3"),
        (seeded["T4"], "Beta Solar", "processing", at(20, 12, 30).isoformat(),
         "no diagnosis yet (state acknowledged)"),
    ]
    rows = list(csv.reader(io.StringIO(report_csv(report))))
    assert rows[0][:4] == ["month", "customer", "fault_class", "tickets"]
    assert rows[1] == ["2026-11", "Alpha Storage", "A", "2", "4", "2", "66.67", "300.0",
                       "2700.0"]
    async with own_db.session() as s:
        october = await sla_report(s, "2026-10")
        beta_only = await sla_report(s, "2026-11", org_id=seeded["beta"])
    assert [(r.customer, r.tickets) for r in october.rows] == [("Beta Solar", 1), ("*", 1)]
    assert [(r.customer, r.fault_class) for r in beta_only.rows] == [
        ("Beta Solar", "B"), ("Beta Solar", "upgrade"), ("*", "B"), ("*", "upgrade")]
    assert [b.customer for b in beta_only.breaches] == ["Beta Solar"]


emu = typer.Typer(name="emu", no_args_is_help=True)
register(emu)


@pytest.fixture
async def api_url(own_db: Database) -> AsyncIterator[tuple[str, str]]:
    """The API on the seeded database, served by uvicorn; (url, admin token)."""
    async with own_db.session() as s:
        _, token, _ = await add_user(s, f"admin-{secrets.token_hex(3)}", "admin")
    app = create_app(settings_for(own_db), own_db)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done(), 10, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.should_exit = True
        await wait_for(task, 10, "uvicorn to stop")


async def test_emu_sla_report_as_json_and_csv(seeded: dict[str, int],
                                              api_url: tuple[str, str]) -> None:
    url, token = api_url
    runner = CliRunner()

    def emu_run(*args: str) -> str:
        result = runner.invoke(emu, [*args, "--server", url, "--token", token],
                               env={"EMU_SERVER_URL": "", "EMU_TOKEN": ""})
        assert result.exit_code == 0, result.output
        return result.output

    as_json = json.loads(await asyncio.to_thread(
        emu_run, "sla", "report", "--month", "2026-11", "--format", "json"))
    assert [(r["customer"], r["fault_class"], r["compliance_pct"]) for r in as_json["rows"]] == [
        (c, k, pct) for c, k, _, _, _, pct, _, _ in EXPECTED_ROWS]
    as_csv = await asyncio.to_thread(emu_run, "sla", "report", "--month", "2026-11",
                                     "--format", "csv")
    assert as_csv.splitlines()[1] == "2026-11,Alpha Storage,A,2,4,2,66.67,300.0,2700.0"
    table = await asyncio.to_thread(emu_run, "sla", "report", "--month", "2026-11")
    assert "breaches: 3" in table
    shown = await asyncio.to_thread(emu_run, "tickets", "show", str(seeded["T2"]))
    assert "sla_breach" in shown
    listed = await asyncio.to_thread(emu_run, "tickets", "list", "--class", "a")
    assert [line.split()[0] for line in listed.splitlines()[1:3]] == [
        str(seeded["T2"]), str(seeded["T1"])]
    bad = runner.invoke(emu, ["sla", "report", "--month", "2026-13", "--server", url,
                              "--token", token], env={"EMU_SERVER_URL": "", "EMU_TOKEN": ""})
    assert bad.exit_code == 1
