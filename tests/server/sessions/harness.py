"""A whole remote-session rig in one process: database, SSH gateway, agent, simulator, `ssh`.

The agent is reached through `DirectLink` (the agent's session manager called in-process,
after the deciding transaction commits), standing in for the signed command channel; the
engineer is the real OpenSSH client with a generated key, a generated known_hosts and no
user configuration.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from sqlmodel.ext.asyncio.session import AsyncSession

from agent.config import AgentSettings
from agent.sessions import AgentSessions, public_key_line
from protocols.clock import Clock
from protocols.sessions import Grant, Scope
from server.core.db import Database
from server.models import Agent, Organisation, Site, Unit, User
from server.sessions import keys, service
from server.sessions.authority import DbAuthority
from server.sessions.gateway import Gateway
from server.sessions.link import after_commit
from server.sessions.models import RemoteSession
from server.sessions.ops import SessionOps
from server.tickets import service as tickets
from simulators.server import Simulator

SSH = "/usr/bin/ssh"
SSH_TIMEOUT = 30.0


def write_key(key: asyncssh.SSHKey, path: Path) -> Path:
    """A private key file OpenSSH accepts (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key("openssh"))
    return path


class DirectLink:
    """The agent, called directly once the transaction commits (the command channel's seam)."""

    def __init__(self, db: Database, agent: AgentSessions, clock: Clock) -> None:
        self.db = db
        self.agent = agent
        self.clock = clock
        self.tasks: set[asyncio.Task[Any]] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.reports: list[dict[str, Any]] = []

    async def open(self, s: AsyncSession, site: str, grant: Grant,
                   info: dict[str, Any]) -> str | None:
        async def report(detail: dict[str, Any]) -> None:
            self.reports.append(detail)
            if detail.get("state") == "approved" and detail.get("by") == "onsite":
                async with self.db.session() as s2:
                    await service.approve_onsite(s2, grant.session, detail["technician"],
                                                 now=self.clock.now())

        async def run() -> None:
            self.results[grant.session] = await self.agent.open(grant, report, info)

        def start() -> Any:
            task = asyncio.create_task(run())
            self.tasks.add(task)
            return asyncio.sleep(0)

        after_commit(s, start)
        return None

    async def close(self, s: AsyncSession, site: str, session: str, reason: str) -> None:
        async def tell() -> None:
            await self.agent.close(session, reason)

        after_commit(s, tell)

    async def diagnostic(self, s: AsyncSession, site: str, session: str,
                         action: dict[str, Any]) -> str | None:
        return None

    async def stop(self) -> None:
        await self.agent.close_all()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class Rig:
    """Everything a session test touches."""

    db: Database
    clock: Clock
    tmp: Path
    gateway: Gateway
    agent: AgentSessions
    link: DirectLink
    ops: SessionOps
    site_id: int
    site_code: str
    org_id: int
    ticket_id: int
    engineer: User
    customer: User
    other_customer: User
    engineer_key: Path
    known_hosts: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def request(self, *, gateway_shell: bool = True, units: tuple[str, ...] = ("unit1",),
                      max_duration_s: int = 600) -> str:
        async with self.db.session() as s:
            row = await self.ops.request(s, self.engineer, ticket_id=self.ticket_id,
                                         reason="inverter trips at noon",
                                         scope=Scope(shell=gateway_shell, units=units),
                                         max_duration_s=max_duration_s, now=self.clock.now())
            return row.id

    async def approve(self, session: str) -> None:
        async with self.db.session() as s:
            await self.ops.approve(s, session, self.customer, now=self.clock.now())

    async def revoke(self, session: str) -> None:
        async with self.db.session() as s:
            await self.ops.revoke(s, session, self.customer, now=self.clock.now())

    async def row(self, session: str) -> RemoteSession:
        async with self.db.session() as s:
            return await service.get_session(s, session)

    def ssh_args(self, session: str, *extra: str, key: Path | None = None) -> list[str]:
        return [SSH, "-F", "/dev/null", "-p", str(self.gateway.port),
                "-i", str(key or self.engineer_key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=10",
                "-o", "LogLevel=ERROR", *extra, f"{session}@127.0.0.1"]

    async def ssh(self, session: str, *command: str, options: tuple[str, ...] = (),
                  key: Path | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_args(session, *options, key=key), *command,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(SSH_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        return proc.returncode or 0, out.decode(), err.decode()

    async def spawn_ssh(self, session: str, *command: str,
                        options: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_args(session, *options), *command, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        return proc


async def seed(db: Database, clock: Clock, engineer_key: asyncssh.SSHKey,
               agent_key: asyncssh.SSHKey, policy: dict[str, Any]) -> dict[str, Any]:
    """Two organisations, a site with two units and an enrolled agent, users, a ticket."""
    tag = uuid.uuid4().hex[:8]
    async with db.session() as s:
        own, other = Organisation(name=f"ses-own-{tag}"), Organisation(name=f"ses-other-{tag}")
        s.add_all([own, other])
        await s.flush()
        assert own.id is not None
        assert other.id is not None
        site = Site(code=f"ses-{tag}", name="Session site", org_id=own.id, policy=policy)
        s.add(site)
        await s.flush()
        assert site.id is not None
        s.add_all([Unit(site_id=site.id, device="unit1"), Unit(site_id=site.id, device="unit2")])
        agent = Agent(agent_id=f"ses-{tag}", site_id=site.id)
        engineer = User(name=f"eng-{tag}", role="engineer")
        customer = User(name=f"cust-{tag}", role="customer", org_id=own.id)
        other_customer = User(name=f"other-{tag}", role="customer", org_id=other.id)
        s.add_all([agent, engineer, customer, other_customer])
        await s.flush()
        assert engineer.id is not None
        await keys.set_agent_key(s, agent, public_key_line(agent_key))
        await keys.add_key(s, engineer.id, public_key_line(engineer_key), "laptop")
        ticket = await tickets.open_ticket(s, site_id=site.id, source="phone",
                                           title="inverter trips", fault_class="B",
                                           now=clock.now())
        return {"site_id": site.id, "site_code": site.code, "org_id": own.id,
                "ticket_id": ticket.id, "engineer": engineer, "customer": customer,
                "other_customer": other_customer}


@asynccontextmanager
async def session_rig(db: Database, tmp: Path, clock: Clock, sim: Simulator | None, *,
                      policy: dict[str, Any] | None = None,
                      agent_overrides: dict[str, Any] | None = None,
                      units: dict[str, tuple[str, int]] | None = None) -> AsyncIterator[Rig]:
    """Start gateway and agent around a seeded world; stop everything afterwards."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    engineer_key = asyncssh.generate_private_key("ssh-ed25519")
    agent_key_path = tmp / "agent-key"
    agent_key = asyncssh.generate_private_key("ssh-ed25519")
    write_key(agent_key, agent_key_path)
    world = await seed(db, clock, engineer_key, agent_key, policy or {})
    gateway = Gateway(DbAuthority(db, clock), host_key, port=0, poll_s=0.1, clock=clock)
    await gateway.start()
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{gateway.port} {gateway.host_public_key}\n")
    where = units or {}
    if sim is not None:
        for n, name in ((1, "unit1"), (2, "unit2")):
            host, port, _unit_id = sim.where(n)
            where.setdefault(name, (host, port))
    devices = [{"name": name, "protocol": "modbus-tcp", "profile": "sunspec", "host": host,
                "port": port, "unit_id": 1} for name, (host, port) in where.items()]
    settings = AgentSettings(
        site=world["site_code"], state_dir=tmp / "agent", devices=devices,
        sessions={"gateway": f"127.0.0.1:{gateway.port}",
                  "gateway_host_key": gateway.host_public_key, "key_file": agent_key_path,
                  "shell": ["/bin/sh"], "check_interval_s": 0.05,
                  **(agent_overrides or {})})
    agent = AgentSessions(settings, clock)
    link = DirectLink(db, agent, clock)
    rig = Rig(db=db, clock=clock, tmp=tmp, gateway=gateway, agent=agent, link=link,
              ops=SessionOps(link), engineer_key=write_key(engineer_key, tmp / "engineer-key"),
              known_hosts=known_hosts, **world)
    try:
        yield rig
    finally:
        for proc in rig.procs:
            if proc.returncode is None:
                proc.kill()
            await proc.communicate()
        await link.stop()
        await gateway.close()
