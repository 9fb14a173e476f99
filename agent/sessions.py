"""Remote sessions on the agent: dial the gateway outbound, offer approved targets only.

    session.open (signed Grant) --> [on-site policy: wait for `emu agent approve <id>`]
        --> asyncssh client to the gateway (own key, pinned host key), user agent+<id>
        --> one reverse listener per approved target (`<unit>:502`, `gateway-shell:22`)
        --> gateway opens forwarded channels: unit -> TCP to the unit, shell -> `shell`
    ends at: session.close, the gateway cutting us (revoke) and refusing a redial, or the
    grant's time on the agent's own clock

The agent enforces the grant itself, so a compromised server alone cannot widen or extend
access: only targets in the signed scope are offered (asyncssh refuses channels for any other
listener), each channel re-checks scope and time, and every tunnel is cut at
`min(claim_by + max_duration, first use + max_duration)` by the agent's clock, and never
later than its own `sessions.max_duration_s`. Nothing here listens on a network interface.

On-site approval goes through files in `<state_dir>/sessions/`: the agent writes
`pending/<id>.json` and waits; `emu agent approve <id>` (run by the technician on the gateway)
writes `approved/<id>.json`; the agent verifies it names a pending session and reports the
approval to the server with the technician's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import json
import logging
import os
import struct
import termios
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh

from agent.config import AgentSettings
from agent.errors import AgentError
from emu.relay import Splice
from protocols.clock import Clock, SystemClock
from protocols.sessions import (
    AGENT_USER_PREFIX,
    SHELL_TARGET,
    FrameDecoder,
    FrameType,
    Grant,
    SessionError,
    check_session_id,
    data_frames,
    encode_frame,
    exit_frame,
)

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], Awaitable[None]]
SESSIONS_DIR = "sessions"
MAX_BACKOFF_S = 5.0
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
"""AES-GCM first: hardware-accelerated, several times faster than chacha20 in asyncssh."""
WINDOW = 8 * 1024 * 1024
MAX_PACKET = 256 * 1024
"""Gateway-to-agent packets may be this large (both ends asyncssh): fewer per-packet costs."""


class SessionRefused(AgentError):
    """The agent will not open this session (outside its policy, config or time)."""


class LocalApprovalError(AgentError):
    """`emu agent approve` named no pending session, or the state directory is unusable."""


def load_or_create_key(path: Path) -> asyncssh.SSHKey:
    """The agent's own SSH key (Ed25519), generated with mode 0600 on first use (blocking)."""
    if path.exists():
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="emu-agent")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key("openssh"))
    return key


def public_key_line(key: asyncssh.SSHKey) -> str:
    """The public half as one OpenSSH line (what enrolment registers)."""
    return key.export_public_key("openssh").decode().strip()


# --- on-site approval (files shared with `emu agent approve`) ------------------------------------


def sessions_dir(settings: AgentSettings) -> Path:
    """Where pending and approved on-site sessions are noted."""
    return settings.state_dir / SESSIONS_DIR


def write_pending(settings: AgentSettings, grant: Grant, info: dict[str, Any]) -> None:
    """Note a session waiting for the technician (blocking)."""
    folder = sessions_dir(settings) / "pending"
    folder.mkdir(parents=True, exist_ok=True)
    body = {**info, "session": grant.session, "scope": grant.scope.model_dump(mode="json"),
            "claim_by": grant.claim_by.isoformat(), "max_duration_s": grant.max_duration_s}
    (folder / f"{grant.session}.json").write_text(json.dumps(body, indent=2), encoding="utf-8")


def list_pending(settings: AgentSettings) -> list[dict[str, Any]]:
    """Sessions waiting for on-site approval (for `emu agent approve` without an id)."""
    folder = sessions_dir(settings) / "pending"
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("s*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text(encoding="utf-8")))
    return out


def approve_locally(settings: AgentSettings, session: str, technician: str | None = None,
                    *, now: datetime) -> dict[str, Any]:
    """The technician's approval at the gateway: a file the running agent picks up (blocking)."""
    try:
        check_session_id(session)
    except SessionError as exc:
        raise LocalApprovalError(str(exc)) from exc
    pending = sessions_dir(settings) / "pending" / f"{session}.json"
    if not pending.exists():
        raise LocalApprovalError(f"no session {session} is waiting for approval on this gateway")
    info: dict[str, Any] = json.loads(pending.read_text(encoding="utf-8"))
    folder = sessions_dir(settings) / "approved"
    folder.mkdir(parents=True, exist_ok=True)
    body = {"session": session, "technician": technician or getpass.getuser(),
            "at": now.isoformat()}
    (folder / f"{session}.json").write_text(json.dumps(body), encoding="utf-8")
    return info


def _take_approval(settings: AgentSettings, session: str) -> dict[str, Any] | None:
    path = sessions_dir(settings) / "approved" / f"{session}.json"
    if not path.exists():
        return None
    try:
        body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path.unlink(missing_ok=True)
    (sessions_dir(settings) / "pending" / f"{session}.json").unlink(missing_ok=True)
    return body if body.get("session") == session else None


def _drop_pending(settings: AgentSettings, session: str) -> None:
    (sessions_dir(settings) / "pending" / f"{session}.json").unlink(missing_ok=True)


# --- the manager --------------------------------------------------------------------------------


class AgentSessions:
    """Every remote session of this agent."""

    def __init__(self, settings: AgentSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.cfg = settings.sessions
        self.clock = clock or SystemClock()
        self.units = {d.name: (d.host, d.port) for d in settings.devices
                      if d.protocol == "modbus-tcp" and d.host}
        self.tunnels: dict[str, Tunnel] = {}
        self._key: asyncssh.SSHKey | None = None

    async def key(self) -> asyncssh.SSHKey:
        """This agent's SSH key (created on first use)."""
        if self._key is None:
            path = self.settings.state_path(self.cfg.key_file)
            self._key = await asyncio.to_thread(load_or_create_key, path)
        return self._key

    def check(self, grant: Grant) -> None:
        """Refuse a grant this agent will not honour."""
        if not self.cfg.gateway or not self.cfg.gateway_host_key:
            raise SessionRefused("no gateway configured (sessions.gateway and "
                                 "sessions.gateway_host_key are set at enrolment)")
        if grant.session in self.tunnels:
            raise SessionRefused(f"session {grant.session} is open already")
        if self.clock.now() >= grant.claim_by:
            raise SessionRefused("the grant's claim-by deadline has passed")
        if grant.max_duration_s > self.cfg.max_duration_s:
            raise SessionRefused(f"maximum duration {grant.max_duration_s} s exceeds this "
                                 f"agent's limit of {self.cfg.max_duration_s} s")
        unknown = sorted(set(grant.scope.units) - set(self.units))
        if unknown:
            raise SessionRefused(f"not Modbus TCP units of this agent: {', '.join(unknown)}")

    async def open(self, grant: Grant, report: Report | None = None,
                   info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Carry out a grant until the session ends; the result says how it ended."""
        self.check(grant)
        tunnel = Tunnel(self, grant, report, info or {})
        self.tunnels[grant.session] = tunnel
        try:
            return await tunnel.run()
        finally:
            self.tunnels.pop(grant.session, None)
            await asyncio.to_thread(_drop_pending, self.settings, grant.session)

    async def close(self, session: str, reason: str = "closed by the server") -> bool:
        """End a session now (session.close); False if it was not open here."""
        tunnel = self.tunnels.get(session)
        if tunnel is None:
            return False
        tunnel.stop(reason)
        return True

    async def close_all(self) -> None:
        """The agent is stopping."""
        for tunnel in list(self.tunnels.values()):
            tunnel.stop("agent stopping")


class Tunnel:
    """One session's connection to the gateway, redialled until the session ends."""

    def __init__(self, manager: AgentSessions, grant: Grant, report: Report | None,
                 info: dict[str, Any]) -> None:
        self.m = manager
        self.grant = grant
        self.report = report
        self.info = info
        self.first_use: datetime | None = None
        self.stopped = asyncio.Event()
        self.reason = ""
        self.conn: asyncssh.SSHClientConnection | None = None
        self.forwarded: dict[str, dict[str, int]] = {}
        self.splices: set[Splice] = set()
        self.shells: set[AgentShell] = set()

    def deadline(self) -> datetime:
        """When access ends on this agent's clock."""
        limit = timedelta(seconds=min(self.grant.max_duration_s, self.m.cfg.max_duration_s))
        end = self.grant.claim_by + limit
        if self.first_use is not None:
            end = min(end, self.first_use + limit)
        return end

    def usable(self) -> bool:
        """Still inside the grant and not stopped."""
        return not self.stopped.is_set() and self.m.clock.now() < self.deadline()

    def stop(self, reason: str) -> None:
        """End the session: cut the tunnel and every channel."""
        if self.stopped.is_set():
            return
        self.reason = reason
        self.stopped.set()
        for splice in list(self.splices):
            splice.close()
        for shell in list(self.shells):
            shell.kill()
        if self.conn is not None:
            self.conn.close()

    async def _report(self, detail: dict[str, Any]) -> None:
        if self.report is not None:
            try:
                await self.report(detail)
            except Exception:
                log.exception("sessions: reporting %s failed", detail.get("state"))

    async def run(self) -> dict[str, Any]:
        """Wait for on-site approval if needed, then keep the tunnel up until the end."""
        watchdog = asyncio.create_task(self._watchdog(), name=f"session-watch-{self.grant.session}")
        try:
            if not self.grant.approved and not await self._wait_for_technician():
                return {"session": self.grant.session, "ended": self.reason or "not approved"}
            await self._dial_loop()
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self.stop(self.reason or "ended")
        return {"session": self.grant.session, "ended": self.reason,
                "forwarded": self.forwarded}

    async def _watchdog(self) -> None:
        """Enforce the grant's time on the agent's own clock."""
        while not self.stopped.is_set():
            if self.m.clock.now() >= self.deadline():
                log.info("sessions: %s reached its end on the agent's clock", self.grant.session)
                self.stop("expired on the agent's clock")
                return
            await asyncio.sleep(self.m.cfg.check_interval_s)

    async def _wait_for_technician(self) -> bool:
        settings = self.m.settings
        await asyncio.to_thread(write_pending, settings, self.grant, self.info)
        await self._report({"state": "awaiting_onsite_approval"})
        while not self.stopped.is_set():
            if self.m.clock.now() >= self.grant.claim_by:
                self.stop("not approved on site before the claim-by deadline")
                return False
            approval = await asyncio.to_thread(_take_approval, settings, self.grant.session)
            if approval is not None:
                log.info("sessions: %s approved on site by %s", self.grant.session,
                         approval.get("technician"))
                await self._report({"state": "approved", "by": "onsite",
                                    "technician": str(approval.get("technician", "?"))})
                return True
            await asyncio.sleep(self.m.cfg.check_interval_s)
        return False

    async def _dial_loop(self) -> None:
        delay = 0.2
        while self.usable():
            try:
                await self._connect_and_serve()
                delay = 0.2
            except asyncssh.PermissionDenied:
                self.stop("the gateway refused the tunnel (session ended or revoked)")
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                if not self.usable():
                    break
                log.warning("sessions: tunnel of %s failed: %s; redialling in %.1f s",
                            self.grant.session, exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.stopped.wait()
                delay = min(delay * 2, MAX_BACKOFF_S)
        if not self.stopped.is_set() and self.m.clock.now() >= self.deadline():
            self.stop("expired on the agent's clock")

    async def _connect_and_serve(self) -> None:
        cfg = self.m.cfg
        if cfg.gateway is None or cfg.gateway_host_key is None:  # check() refused this before
            raise SessionRefused("no gateway configured")
        host, _, port = cfg.gateway.rpartition(":")
        pinned = asyncssh.import_public_key(cfg.gateway_host_key)
        async with asyncio.timeout(cfg.connect_timeout_s):
            conn = await asyncssh.connect(
                host.strip("[]"), int(port), username=AGENT_USER_PREFIX + self.grant.session,
                client_keys=[await self.m.key()], known_hosts=([pinned], [], []),
                agent_path=None, config=None, preferred_auth="publickey",
                keepalive_interval=15, encryption_algs=list(CIPHERS), window=WINDOW)
        self.conn = conn
        try:
            if self.stopped.is_set():
                return
            async with asyncio.timeout(cfg.connect_timeout_s):
                for target_host, target_port in self.grant.scope.targets():
                    await conn.create_server(self._factory(target_host, target_port),
                                             target_host, target_port, window=WINDOW,
                                             max_pktsize=MAX_PACKET)
            log.info("sessions: %s tunnel up, offering %s", self.grant.session,
                     self.grant.scope.targets())
            await self._report({"state": "ready",
                                "targets": [f"{h}:{p}" for h, p in self.grant.scope.targets()]})
            await conn.wait_closed()
        finally:
            conn.close()
            self.conn = None

    def _factory(self, host: str, port: int) -> Callable[[str, int], Awaitable[Any]]:
        async def accept(orig_host: str, orig_port: int) -> Any:
            if not self.usable() or not self.grant.scope.allows(host, port):
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                "outside the approved session")
            if self.first_use is None:
                self.first_use = self.m.clock.now()
            if host == SHELL_TARGET:
                shell = AgentShell(self)
                self.shells.add(shell)
                return shell
            return await self._unit_channel(host, port)

        return accept

    async def _unit_channel(self, name: str, port: int) -> Any:
        unit_host, unit_port = self.m.units[name]
        target = f"{name}:{port}"

        def closed(splice: Splice) -> None:
            self.splices.discard(splice)
            totals = self.forwarded.setdefault(target, {"up": 0, "down": 0})
            totals["up"] += splice.a.bytes_in
            totals["down"] += splice.b.bytes_in

        splice = Splice("gateway", "unit", on_close=closed)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: splice.b, unit_host, unit_port)
        except OSError as exc:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            f"unit {name} does not answer: {exc}") from exc
        self.splices.add(splice)
        return splice.a


def _set_size(fd: int, cols: int, rows: int) -> None:
    """Tell a pty its window size."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class AgentShell:
    """The shell end of a forwarded channel: frames in, a restricted shell process, frames out."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.chan: Any = None
        self.decoder = FrameDecoder()
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []
        self.stdin_eof = False
        self.master: int | None = None
        """The pty's controlling side, when the engineer asked for a terminal."""

    def connection_made(self, chan: Any) -> None:
        """The gateway opened the channel."""
        self.chan = chan

    def session_started(self) -> None:
        """Nothing to do until the request frame."""

    def data_received(self, data: bytes, _datatype: Any = None) -> None:
        """Frames from the gateway."""
        try:
            frames = self.decoder.feed(data)
        except SessionError as exc:
            log.warning("sessions: bad shell frame: %s", exc)
            self.kill()
            return
        for frame in frames:
            if frame.type is FrameType.REQUEST and self.task is None:
                request = frame.json()
                self.task = asyncio.create_task(self._run(request), name="session-shell")
            elif frame.type is FrameType.STDIN:
                self._stdin(frame.payload)
            elif frame.type is FrameType.STDIN_EOF:
                self.stdin_eof = True
                self._stdin(b"")
            elif frame.type is FrameType.WINDOW and self.master is not None:
                size = frame.json()
                _set_size(self.master, int(size.get("cols", 80)), int(size.get("rows", 24)))

    def _stdin(self, data: bytes) -> None:
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.write(self.master, data if data else b"\x04")
            return
        proc = self.proc
        if proc is None or proc.stdin is None:
            if data:
                self.pending.append(data)
            return
        if data:
            proc.stdin.write(data)
        if self.stdin_eof and proc.stdin.can_write_eof():
            proc.stdin.write_eof()

    async def _run(self, request: dict[str, Any]) -> None:
        cfg = self.tunnel.m.cfg
        settings = self.tunnel.m.settings
        command = request.get("command")
        argv = [*cfg.shell, "-c", str(command)] if command is not None else [*cfg.shell, "-i"]
        home = settings.state_dir / SESSIONS_DIR / "home"
        await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
               "TERM": str(request.get("term") or "dumb"),
               "EMU_SESSION": self.tunnel.grant.session, "LANG": "C.UTF-8"}
        status = 255
        try:
            if request.get("term"):
                status = await self._run_pty(argv, home, env, request)
                return
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=home, env=env, start_new_session=True)
            for chunk in self.pending:
                self._stdin(chunk)
            self.pending.clear()
            if self.stdin_eof:
                self._stdin(b"")
            await asyncio.gather(self._pump(self.proc.stdout, FrameType.STDOUT),
                                 self._pump(self.proc.stderr, FrameType.STDERR))
            status = await self.proc.wait()
        except OSError as exc:
            self._send(encode_frame(FrameType.STDERR, f"cannot start the shell: {exc}\n".encode()))
        finally:
            self._send(exit_frame(status if status >= 0 else 128 - status))
            if self.chan is not None:
                self.chan.close()
            self.tunnel.shells.discard(self)

    async def _run_pty(self, argv: list[str], home: Path, env: dict[str, str],
                       request: dict[str, Any]) -> int:
        """Run the shell on a pseudo-terminal (interactive `ssh` asks for one)."""
        master, slave = os.openpty()
        _set_size(master, int(request.get("cols") or 80), int(request.get("rows") or 24))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, cwd=home, env=env,
                start_new_session=True)
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        loop = asyncio.get_running_loop()
        drained = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EIO: the shell side of the pty is gone
                data = b""
            if not data:
                loop.remove_reader(master)
                if not drained.done():
                    drained.set_result(None)
                return
            for frame in data_frames(FrameType.STDOUT, data):
                self._send(frame)

        loop.add_reader(master, readable)
        try:
            for chunk in self.pending:
                self._stdin(chunk)
            self.pending.clear()
            status = await self.proc.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await drained
        finally:
            loop.remove_reader(master)
            self.master = None
            os.close(master)
        return status

    async def _pump(self, stream: asyncio.StreamReader | None, kind: FrameType) -> None:
        if stream is None:
            return
        while chunk := await stream.read(32768):
            for frame in data_frames(kind, chunk):
                self._send(frame)

    def _send(self, frame: bytes) -> None:
        if self.chan is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                self.chan.write(frame)

    def eof_received(self) -> bool:
        """The gateway stopped sending."""
        return False

    def connection_lost(self, _exc: Exception | None) -> None:
        """The channel went: end the shell."""
        self.chan = None
        self.kill()

    def pause_writing(self) -> None:
        """Shell output is small; no back-pressure."""

    def resume_writing(self) -> None:
        """Shell output is small; no back-pressure."""

    def kill(self) -> None:
        """Stop the shell process (its whole process group)."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
        if self.chan is not None:
            self.chan.close()
