"""Enrolment hands the agent the gateway (address, pinned host key) and registers its SSH key."""

from __future__ import annotations

import asyncio
import secrets
import tomllib
from pathlib import Path

import asyncssh
import httpx
from sqlmodel import select

from agent.enrol import enrol
from server.app import create_app
from server.core.config import ServerSettings
from server.core.db import Database
from server.enrolment import create_enrolment
from server.models import Agent, Organisation, Site
from server.sessions.gateway import key_text, load_host_key
from server.sessions.models import AgentSshKey


async def test_enrolment_pins_the_gateway_and_registers_the_agent_key(
        db: Database, tmp_path: Path) -> None:
    host_key = load_host_key(tmp_path / "gw_host_key")
    settings = ServerSettings(
        database_url=db.url, secret_key=secrets.token_hex(16), roles=("api",),
        data_dir=tmp_path, gateway={"host_key_file": tmp_path / "gw_host_key",
                                    "public_host": "gw.example.net", "port": 2222})
    app = create_app(settings, db)
    code = f"enr-{secrets.token_hex(4)}"
    async with db.session() as s:
        org = Organisation(name=f"org-{code}")
        s.add(org)
        await s.flush()
        assert org.id is not None
        s.add(Site(code=code, name="enrol", org_id=org.id))
        await s.flush()
        issued = await create_enrolment(s, code, code, now=app.state.clock())
    config = tmp_path / "agent.toml"
    config.write_text(f'site = "{code}"\n', encoding="utf-8")

    await enrol("http://emu.test", issued.token, code, config,
                transport=httpx.ASGITransport(app=app))

    sessions = tomllib.loads(config.read_text(encoding="utf-8"))["sessions"]
    assert sessions["gateway"] == "gw.example.net:2222"
    assert sessions["gateway_host_key"] == key_text(host_key)
    key_file = Path(sessions["key_file"])
    key = await asyncio.to_thread(asyncssh.read_private_key, key_file)
    mode = (await asyncio.to_thread(key_file.stat)).st_mode
    assert mode & 0o077 == 0
    async with db.session() as s:
        agent = (await s.exec(select(Agent).where(Agent.agent_id == code))).one()
        row = (await s.exec(select(AgentSshKey).where(AgentSshKey.agent_id == agent.id))).one()
    assert row.public_key == key_text(key)
