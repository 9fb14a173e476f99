"""`emu commissioning ...` against a live server: the plan's life, on-site results, documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from server.commissioning.cli import parse_equipment, parse_target
from tests.server.test_api_common import World
from tests.server.test_cli_verbs import auth, run, server_url, world  # noqa: F401 - fixtures

API_FREE = ["--server", "http://127.0.0.1:1"]


def test_equipment_and_target_syntax() -> None:
    assert parse_equipment("EMU-BS:3:A1, A2@1.2.0") == {
        "series": "EMU-BS", "count": 3, "serials": ["A1", "A2"], "firmware": "1.2.0"}
    assert parse_equipment("EMU-PV:2") == {"series": "EMU-PV", "count": 2}
    assert parse_target("10.0.0.5:1502/1-5,9") == {"host": "10.0.0.5", "port": 1502,
                                                   "unit_ids": "1-5,9"}
    assert parse_target("gw") == {"host": "gw", "port": 502, "unit_ids": "1-10"}
    with pytest.raises(typer.BadParameter):
        parse_equipment("bs:3")


async def test_plan_lifecycle_from_the_command_line(
    world: World, server_url: str, tmp_path: Path  # noqa: F811 - fixtures
) -> None:
    staff = auth(server_url, world.engineer_token)
    customer = auth(server_url, world.own.token)
    created = await run(["commissioning", "create", "--site", str(world.own.site_id),
                         "--title", "Depot B", "--mode", "onsite", "-e", "EMU-BS:1:SN-B1",
                         "-t", "Ana Ruiz", "--target", "192.0.2.7/1-4", "--from", "2031-04-01",
                         "--json", *staff])
    assert created.exit_code == 0, created.output
    plan = json.loads(created.output)
    pid = str(plan["id"])
    assert plan["targets"] == [{"host": "192.0.2.7", "port": 502, "unit_ids": "1-4"}]
    refused = await run(["commissioning", "run", pid, *staff])
    assert refused.exit_code == 1
    assert "schedule it before running" in refused.output
    for args, who in ((["issue", pid], staff), (["acknowledge", pid], customer),
                      (["schedule", pid], staff)):
        result = await run(["commissioning", *args, *who])
        assert result.exit_code == 0, result.output
    recorded = await run(["commissioning", "record", pid, "--serial", "SN-B1", "--series",
                          "EMU-BS", "--check", "earthing", "--pass", "--detail", "0.08 Ohm",
                          *staff])
    assert recorded.exit_code == 0, recorded.output
    text = await run(["commissioning", "report", pid, *customer])
    assert text.exit_code == 0, text.output
    assert "EMU-BS SN-B1: INCOMPLETE" in text.output
    assert "earthing" in text.output
    assert "0.08 Ohm" in text.output
    pdf = tmp_path / "report.pdf"
    saved = await run(["commissioning", "report", pid, "--format", "pdf", "-o", str(pdf),
                       *customer])
    assert saved.exit_code == 0, saved.output
    assert pdf.read_bytes().startswith(b"%PDF")
    doc = await run(["commissioning", "document", pid, "--format", "html", *customer])
    assert "Commissioning plan CP-" in doc.output
    listed = await run(["commissioning", "list", *customer])
    assert f"CP-{int(pid):04d}" in listed.output
    shown = await run(["commissioning", "show", pid, *staff])
    assert "checklist EMU-BS: communication" in shown.output
