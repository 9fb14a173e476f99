"""`emu agent approve`: lists what waits on this gateway, approves one, refuses unknown ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from agent.cli import app
from agent.config import AgentSettings
from agent.sessions import sessions_dir, write_pending
from protocols.sessions import Grant, Scope


def test_agent_approve(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'site = "s1"\nstate_dir = "{tmp_path}"\n', encoding="utf-8")
    settings = AgentSettings(site="s1", state_dir=tmp_path)
    grant = Grant(session="s0123456789ab", scope=Scope(units=("emu1",)),
                  claim_by=datetime.now(UTC) + timedelta(hours=1), max_duration_s=600,
                  approval="onsite", approved=False)
    write_pending(settings, grant, {"reason": "inverter trips", "ticket": 7})
    runner = CliRunner()

    listed = runner.invoke(app, ["approve", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "s0123456789ab" in listed.output
    assert "inverter trips" in listed.output

    unknown = runner.invoke(app, ["approve", "s999999999999", "--config", str(config)])
    assert unknown.exit_code == 1

    done = runner.invoke(app, ["approve", "s0123456789ab", "--name", "anna",
                               "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert (sessions_dir(settings) / "approved" / "s0123456789ab.json").exists()
