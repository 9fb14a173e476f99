"""Acceptance of issue 6 with the real OpenSSH client: consent, shell, Modbus over -L, scope,
revoke, expiry, keys, recording and audit."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import sqlalchemy as sa
from pymodbus.client import AsyncModbusTcpClient
from sqlmodel import col, select

from protocols.clock import ManualClock
from protocols.sessions import replay_output
from server.core.db import Database
from server.sessions import service
from server.sessions.errors import NotYourSession
from server.sessions.models import SessionAudit, SessionRecording
from simulators.server import Simulator
from tests.server.sessions.harness import Rig
from tests.support.waiting import wait_for

READY_TIMEOUT = 15.0
SUNS = [0x5375, 0x6E53]  # "SunS" at 40000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def approved(rig: Rig, **request: object) -> str:
    session = await rig.request(**request)  # type: ignore[arg-type]
    await rig.approve(session)
    assert await rig.gateway.wait_ready(session, READY_TIMEOUT), "agent tunnel never came up"
    return session


async def read_through(port: int) -> list[int]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    try:
        async def connected() -> bool:
            return bool(await client.connect())

        await wait_for(connected, 10.0, "the -L port to accept connections")
        reply = await client.read_holding_registers(40000, count=2, device_id=1)
        assert not reply.isError(), reply
        return list(reply.registers)
    finally:
        client.close()


async def test_refused_before_approval_then_shell_and_unit(rig: Rig) -> None:
    session = await rig.request(gateway_shell=True, units=("unit1",))
    rc, _, err = await rig.ssh(session, "echo", "ok")
    assert rc == 255
    assert "Permission denied" in err

    await rig.approve(session)
    assert await rig.gateway.wait_ready(session, READY_TIMEOUT)
    rc, out, err = await rig.ssh(session, "echo", "ok")
    assert (rc, out) == (0, "ok\n"), err
    assert (await rig.row(session)).state == "active"

    port = free_port()
    proc = await rig.spawn_ssh(session, options=("-N", "-L", f"{port}:unit1:502"))
    assert await read_through(port) == SUNS
    proc.terminate()
    await proc.wait()


async def test_unit_outside_scope_is_refused(rig: Rig) -> None:
    session = await approved(rig, gateway_shell=False, units=("unit1",))
    rc, _, err = await rig.ssh(session, options=("-W", "unit2:502"))
    assert rc == 255
    assert "forwarding failed" in err
    rc, out, _ = await rig.ssh(session, "echo", "ok")  # no shell in this scope either
    assert rc == 255
    assert out == ""

    async def refused() -> list[str] | None:
        async with rig.db.session() as s:
            found = [str(e.detail.get("target")) for e in await service.audit_entries(s, session)
                     if e.kind == "target.refused"]
        return found if len(found) == 2 else None

    assert await wait_for(refused, 5.0, "both refusals in the audit log") == [
        "unit2:502", "gateway-shell:22"]


async def test_revoke_drops_live_connection(rig: Rig) -> None:
    session = await approved(rig, gateway_shell=True, units=("unit1",))
    proc = await rig.spawn_ssh(session, "sleep", "60")
    await wait_for(lambda: bool((rig.gateway.live.get(session) or None)
                                and rig.gateway.live[session].shells), 10.0,
                   "the engineer's shell to open")
    await rig.revoke(session)
    await wait_for(proc.wait(), 2.0, "the live ssh connection to drop after the revoke")
    rc, _, err = await rig.ssh(session, "echo", "ok")
    assert rc == 255
    assert "Permission denied" in err
    assert (await rig.row(session)).state == "revoked"


async def test_expiry_refuses_new_connections(rig: Rig, clock: ManualClock) -> None:
    session = await approved(rig, gateway_shell=True, units=(), max_duration_s=300)
    rc, out, _ = await rig.ssh(session, "echo", "ok")
    assert (rc, out) == (0, "ok\n")
    clock.advance(301)

    async def expired() -> bool:
        return (await rig.row(session)).state == "expired"

    await wait_for(expired, 10.0, "the gateway to expire the session")
    rc, _, err = await rig.ssh(session, "echo", "ok")
    assert rc == 255
    assert "Permission denied" in err
    await wait_for(lambda: session in rig.link.results, 10.0, "the agent to end its tunnel")
    assert "expired" in rig.link.results[session]["ended"] or \
        "refused" in rig.link.results[session]["ended"]


async def test_engineer_without_registered_key_is_refused(rig: Rig) -> None:
    import asyncssh

    from tests.server.sessions.harness import write_key

    session = await approved(rig, gateway_shell=True, units=())
    stranger = write_key(asyncssh.generate_private_key("ssh-ed25519"), rig.tmp / "stranger")
    rc, _, err = await rig.ssh(session, "echo", "ok", key=stranger)
    assert rc == 255
    assert "Permission denied" in err


async def test_recording_replays_and_audit_chain_verifies(rig: Rig) -> None:
    session = await approved(rig, gateway_shell=True, units=("unit1",))
    rc, out, _ = await rig.ssh(session, "echo", "recorded-$((6*7))")
    assert (rc, out) == (0, "recorded-42\n")

    async def recording() -> SessionRecording | None:
        async with rig.db.session() as s:
            return (await s.exec(select(SessionRecording)
                                 .where(SessionRecording.session_id == session))).first()

    rec = await wait_for(recording, 10.0, "the shell recording to be stored")
    assert rec is not None
    assert replay_output(rec.cast.splitlines()) == "recorded-42\n"
    async with rig.db.session() as s:
        check = await service.verify_audit(s, session)
        assert check.ok
        assert check.entries >= 5
        first = (await service.audit_entries(s, session))[1]
        await s.exec(sa.update(SessionAudit).where(col(SessionAudit.id) == first.id)
                     .values(actor="customer:mallory"))
    async with rig.db.session() as s:
        check = await service.verify_audit(s, session)
    assert not check.ok
    assert check.first_bad == 1


async def test_onsite_policy_technician_approves_at_the_gateway(
        db: Database, tmp_path: Path, clock: ManualClock, sim: Simulator) -> None:
    from agent.sessions import approve_locally, list_pending
    from tests.server.sessions.harness import session_rig

    async with session_rig(db, tmp_path, clock, sim, policy={"approval": "onsite"}) as rig:
        session = await rig.request(gateway_shell=True, units=())
        settings = rig.agent.settings
        await wait_for(lambda: list_pending(settings), 10.0, "the agent to note the request")
        async with rig.db.session() as s:
            try:
                await rig.ops.approve(s, session, rig.customer, now=clock.now())
                raise AssertionError("a customer approved an on-site session")
            except NotYourSession:
                pass
        await asyncio.to_thread(approve_locally, settings, session, "tech-anna", now=clock.now())
        assert await rig.gateway.wait_ready(session, READY_TIMEOUT)
        row = await rig.row(session)
        assert row.state == "approved"
        assert row.decided_by == "onsite:tech-anna"
        rc, out, _ = await rig.ssh(session, "echo", "ok")
        assert (rc, out) == (0, "ok\n")


async def test_interactive_shell_gets_a_terminal(rig: Rig) -> None:
    session = await approved(rig, gateway_shell=True, units=())
    proc = await asyncio.create_subprocess_exec(
        *rig.ssh_args(session, "-tt"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    rig.procs.append(proc)
    out, _ = await wait_for(proc.communicate(b"tty -s && echo on-a-pty-$((40+2))\nexit 3\n"),
                            20.0, "the interactive shell to finish")
    assert "on-a-pty-42" in out.decode(errors="replace")
    assert proc.returncode == 3


async def test_closing_the_ticket_ends_the_session(rig: Rig) -> None:
    from server.tickets import service as tickets

    session = await approved(rig, gateway_shell=True, units=())
    proc = await rig.spawn_ssh(session, "sleep", "60")
    await wait_for(lambda: bool(rig.gateway.live.get(session)
                                and rig.gateway.live[session].shells), 10.0, "the shell to open")
    async with rig.db.session() as s:
        await tickets.transition(s, rig.ticket_id, "closed", actor="engineer",
                                 now=rig.clock.now())
    await wait_for(proc.wait(), 5.0, "the connection to drop when the ticket closes")
    row = await rig.row(session)
    assert row.state == "closed"
    assert row.end_reason == "the ticket was closed"
