"""The SSH gateway: engineers with the stock `ssh`, agents dialling out, nothing else.

    engineer  ssh -p 2222 <session>@server [-L 15020:<unit>:502]     user = session id
    agent     asyncssh client, user `agent+<session>`, its own key   offers approved targets
                (reverse "tcpip-forward" listeners: `<unit>:502`, `gateway-shell:22`)

An engineer authenticates with a public key registered by the engineer who requested the
session, and only while the session is approved or active and inside its claim-by deadline
or maximum duration; the first engineer connection makes it active. A `-L` to a unit, or a
shell, opens a forwarded channel over the agent's connection, if the target is in the scope
*and* the agent offered it. Shell I/O is recorded as asciicast v2 and bytes are counted per
target. A watcher re-reads every live session (`poll_s`) and cuts its connections as soon as
it is revoked, closed or past its time, so a revoke takes effect within `poll_s` plus a round
trip (the acceptance bound is 2 s).

What the gateway knows about sessions comes from a `SessionAuthority` (the database in the
server, server/sessions/authority.py), so the gateway itself holds no durable state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from emu.relay import Splice
from protocols.clock import Clock, SystemClock
from protocols.sessions import (
    AGENT_USER_PREFIX,
    LIVE,
    SHELL_PORT,
    SHELL_TARGET,
    FrameDecoder,
    FrameType,
    Scope,
    SessionError,
    SessionState,
    asciicast_event,
    asciicast_header,
    data_frames,
    encode_frame,
    json_frame,
)

log = logging.getLogger(__name__)

FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr")
"""AES-GCM first (hardware-accelerated through `cryptography`), then OpenSSH's defaults."""
SERVER_CIPHERS = FAST_CIPHERS[:2] + FAST_CIPHERS[3:]
"""The gateway leaves chacha20 out: OpenSSH clients prefer it, and it is several times slower
in asyncssh than AES-GCM, which every OpenSSH client also speaks."""
WINDOW = 8 * 1024 * 1024

MAX_RECORDING_BYTES = 16 * 1024 * 1024
"""A shell recording longer than this keeps its start and notes the truncation."""


def key_text(key: asyncssh.SSHKey | str) -> str:
    """A public key as `type base64` (no comment): how keys are compared and stored."""
    raw = key.export_public_key("openssh").decode() if not isinstance(key, str) else key
    parts = raw.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key")
    return f"{parts[0]} {parts[1]}"


@dataclass(frozen=True)
class SessionView:
    """What the gateway needs to know about one session, read fresh from the authority."""

    session: str
    site: str
    state: SessionState
    scope: Scope
    engineer_keys: frozenset[str]
    agent_keys: frozenset[str]
    claim_by: datetime
    ends_at: datetime | None
    max_duration_s: int

    def open_for_engineer(self, now: datetime) -> str | None:
        """None if an engineer may connect now, else why not."""
        if self.state not in LIVE:
            return f"session is {self.state.value}"
        if self.state is SessionState.APPROVED and now >= self.claim_by:
            return "the approval was not used before its claim-by deadline"
        if self.ends_at is not None and now >= self.ends_at:
            return "the session's time is over"
        return None


@dataclass
class Recording:
    """One shell channel's asciicast v2 recording, kept in memory until the channel ends."""

    name: str
    started: datetime
    header: str
    t0: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    size: int = 0
    truncated: bool = False

    def add(self, kind: str, data: bytes) -> None:
        """Record input ("i") or output ("o")."""
        if self.truncated or not data:
            return
        if self.size + len(data) > MAX_RECORDING_BYTES:
            self.truncated = True
            return
        self.size += len(data)
        self.lines.append(asciicast_event(time.monotonic() - self.t0,
                                          "i" if kind == "i" else "o", data))

    def text(self) -> str:
        """The whole recording as asciicast v2."""
        return "\n".join([self.header, *self.lines]) + "\n"


class SessionAuthority(Protocol):
    """Where the gateway reads sessions and writes what happened (the server's database)."""

    async def view(self, session: str) -> SessionView | None:
        """The session now, or None if there is no such session."""

    async def activate(self, session: str, peer: str) -> SessionView | None:
        """An engineer connected: start the clock on the first connection; the new view."""

    async def expire(self, session: str, reason: str) -> None:
        """The session ran out of time (claim-by or maximum duration)."""

    async def audit(self, session: str, kind: str, detail: dict[str, Any]) -> None:
        """Append to the session's audit chain."""

    async def channel_closed(self, session: str, target: str, up: int, down: int) -> None:
        """A forwarded channel ended; `up` bytes went to the target, `down` came back."""

    async def store_recording(self, session: str, recording: Recording) -> None:
        """Keep a finished shell recording."""

    async def sweep(self) -> None:
        """Expire sessions past their time and close those of closed tickets, connected or not."""


class _Listener(asyncssh.SSHListener):
    """Stands for an agent's reverse listener: the gateway listens on no port for it."""


@dataclass
class Live:
    """A session with connections on this gateway."""

    session: str
    view: SessionView
    agent: asyncssh.SSHServerConnection | None = None
    offered: set[tuple[str, int]] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    engineers: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    shells: int = 0

    def check_ready(self) -> None:
        """Ready once the agent offers every target of the scope."""
        if self.agent is not None and set(self.view.scope.targets()) <= self.offered:
            self.ready.set()


class Gateway:
    """The asyncssh server; `start()`, then `port`, then `close()`."""

    def __init__(self, authority: SessionAuthority, host_key: asyncssh.SSHKey, *,
                 host: str = "127.0.0.1", port: int = 2222, poll_s: float = 0.25,
                 agent_wait_s: float = 10.0, clock: Clock | None = None) -> None:
        self.authority = authority
        self.host_key = host_key
        self.host = host
        self.requested_port = port
        self.poll_s = poll_s
        self.agent_wait_s = agent_wait_s
        self.clock = clock or SystemClock()
        self.live: dict[str, Live] = {}
        self.on_ready: Callable[[str], None] | None = None
        self._server: asyncssh.SSHAcceptor | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the gateway is not started")
        return int(self._server.get_port())

    @property
    def host_public_key(self) -> str:
        """The host key agents pin and engineers put in known_hosts (`type base64`)."""
        return key_text(self.host_key)

    async def start(self) -> None:
        """Listen and start the watcher."""
        self._server = await asyncssh.create_server(
            lambda: _Connection(self), self.host, self.requested_port,
            server_host_keys=[self.host_key], allow_pty=True, x11_forwarding=False,
            agent_forwarding=False, keepalive_interval=15, login_timeout=30,
            encoding=None, line_editor=False, encryption_algs=list(SERVER_CIPHERS),
            window=WINDOW,
        )
        self._watcher = asyncio.create_task(self._watch(), name="gateway-watch")

    async def close(self) -> None:
        """Stop listening, cut every connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for live in list(self.live.values()):
            self._cut(live, "gateway stopped")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        """A background task the gateway keeps a reference to (and awaits on close)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("gateway task %s failed: %s", task.get_name(), exc, exc_info=exc)

    def live_for(self, view: SessionView) -> Live:
        """The live record of a session (created on its first connection)."""
        live = self.live.get(view.session)
        if live is None:
            live = self.live[view.session] = Live(view.session, view)
        else:
            live.view = view
        return live

    def forget_if_idle(self, live: Live) -> None:
        """Drop a session's record once nothing of it is connected."""
        if live.agent is None and not live.engineers and self.live.get(live.session) is live:
            del self.live[live.session]

    async def _watch(self) -> None:
        """Cut sessions that were revoked, closed or ran out of time."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.authority.sweep()
            except Exception:
                log.exception("gateway: sweeping sessions failed")
            for live in list(self.live.values()):
                try:
                    await self._check(live)
                except Exception:
                    log.exception("gateway: checking session %s failed", live.session)

    async def _check(self, live: Live) -> None:
        view = await self.authority.view(live.session)
        if view is None:
            self._cut(live, "session deleted")
            return
        live.view = view
        now = self.clock.now()
        if view.state not in LIVE:
            self._cut(live, f"session {view.state.value}")
            return
        if view.ends_at is not None and now >= view.ends_at:
            await self.authority.expire(live.session, "maximum duration reached")
            self._cut(live, "maximum duration reached")
        elif view.state is SessionState.APPROVED and now >= view.claim_by and not live.engineers:
            await self.authority.expire(live.session, "approval not used before claim-by")
            self._cut(live, "approval not used before claim-by")

    def _cut(self, live: Live, reason: str) -> None:
        """Close every connection of a session now."""
        conns = [*live.engineers, *([live.agent] if live.agent is not None else [])]
        if conns:
            log.info("gateway: cutting session %s (%s)", live.session, reason)
            self.spawn(self.authority.audit(live.session, "connections.cut",
                                            {"reason": reason, "connections": len(conns)}),
                       f"audit-cut-{live.session}")
        for conn in conns:
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"session ended: {reason}")
        live.engineers.clear()
        live.agent = None
        live.ready.clear()
        self.live.pop(live.session, None)

    async def wait_ready(self, session: str, timeout: float) -> bool:  # noqa: ASYNC109
        """Whether the agent's tunnel of `session` is up (waiting up to `timeout`)."""
        live = self.live.get(session)
        deadline = asyncio.get_running_loop().time() + timeout
        while live is None:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.02)
            live = self.live.get(session)
        try:
            async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                await live.ready.wait()
        except TimeoutError:
            return False
        return True


class _Connection(asyncssh.SSHServer):
    """One SSH connection: an engineer's or an agent's, told apart by the user name."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.kind = "engineer"
        self.session = ""
        self.view: SessionView | None = None
        self.live: Live | None = None
        self.peer = "?"
        self.registered = asyncio.Event()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Remember the connection and who it comes from."""
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; audit the engineer leaving."""
        live, conn = self.live, self.conn
        if live is None or conn is None:
            return
        if self.kind == "agent" and live.agent is conn:
            live.agent = None
            live.offered.clear()
            live.ready.clear()
            self.gw.spawn(self.gw.authority.audit(self.session, "agent.disconnected", {}),
                          "audit")
        elif conn in live.engineers:
            live.engineers.discard(conn)
            self.gw.spawn(self.gw.authority.audit(
                self.session, "engineer.disconnected", {"peer": self.peer}), "audit")
        self.gw.forget_if_idle(live)

    async def begin_auth(self, username: str) -> bool:
        """Look the session up; every user must authenticate (no anonymous access)."""
        if username.startswith(AGENT_USER_PREFIX):
            self.kind = "agent"
            username = username[len(AGENT_USER_PREFIX):]
        self.session = username
        try:
            self.view = await self.gw.authority.view(username)
        except (SessionError, ValueError):
            self.view = None
        return True

    def password_auth_supported(self) -> bool:
        """Keys only."""
        return False

    def kbdint_auth_supported(self) -> bool:
        """Keys only."""
        return False

    def public_key_auth_supported(self) -> bool:
        """Keys only."""
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """The requesting engineer's key (or the site agent's), while the session is live."""
        view = self.view
        if view is None:
            return False
        offered = key_text(key)
        if offered not in (view.agent_keys if self.kind == "agent" else view.engineer_keys):
            self._refused("key not registered for this session")
            return False
        why = view.open_for_engineer(self.gw.clock.now())
        if why is not None:
            self._refused(why)
            return False
        return True

    def _refused(self, why: str) -> None:
        log.info("gateway: %s refused for session %s from %s: %s", self.kind, self.session,
                 self.peer, why)
        if self.view is not None:
            self.gw.spawn(self.gw.authority.audit(
                self.session, f"{self.kind}.refused", {"peer": self.peer, "reason": why}),
                "audit")

    async def auth_completed(self) -> None:
        """Register the connection with its session; an engineer activates it."""
        try:
            await self._register()
        except Exception:
            log.exception("gateway: registering %s of session %s failed", self.kind,
                          self.session)
            if self.conn is not None:
                self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "internal error")
        finally:
            self.registered.set()

    async def _register(self) -> None:
        if self.view is None or self.conn is None:  # pragma: no cover - auth checked both
            return
        if self.kind == "agent":
            live = self.gw.live_for(self.view)
            if live.agent is not None:
                live.agent.close()  # a redial replaces a stale tunnel
            live.agent = self.conn
            live.offered.clear()
            self.live = live
            await self.gw.authority.audit(self.session, "agent.connected", {"peer": self.peer})
            return
        view = await self.gw.authority.activate(self.session, self.peer) or self.view
        self.view = view
        live = self.gw.live_for(view)
        live.engineers.add(self.conn)
        self.live = live

    # --- the agent's offers -------------------------------------------------------------

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """An agent offers a target: accept it only if it is inside the scope."""
        live = self.live
        if self.kind != "agent" or live is None or not live.view.scope.allows(
                listen_host, listen_port):
            log.warning("gateway: refused offer of %s:%s for session %s", listen_host,
                        listen_port, self.session)
            return False
        live.offered.add((listen_host, listen_port))
        live.check_ready()
        if live.ready.is_set() and self.gw.on_ready is not None:
            self.gw.on_ready(self.session)
        return _Listener()

    # --- the engineer's channels --------------------------------------------------------

    async def _target_check(self, host: str, port: int) -> Live:
        # Channels may be requested before auth_completed() has finished registering.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.gw.agent_wait_s):
                await self.registered.wait()
        live = self.live
        if self.kind != "engineer" or live is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "not permitted")
        if not live.view.scope.allows(host, port):
            self.gw.spawn(self.gw.authority.audit(
                self.session, "target.refused", {"target": f"{host}:{port}"}), "audit")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f"{host}:{port} is outside this session's scope")
        return live

    async def _agent_channel(self, live: Live, host: str, port: int,
                             factory: Callable[[], Any]) -> Any:
        if not live.ready.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.gw.agent_wait_s):
                    await live.ready.wait()
        agent = live.agent
        if agent is None or (host, port) not in live.offered:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            "the site's agent has not offered this target")
        try:
            _chan, session = await agent.create_connection(factory, host, port, "engineer", 0)
        except asyncssh.ChannelOpenError:
            raise
        except (OSError, asyncssh.Error) as exc:
            log.warning("gateway: opening %s:%s over the agent failed: %s", host, port, exc)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            "the site's agent did not open the target") from exc
        return session

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        """`ssh -L`: relay to the unit over the agent's connection, if in scope."""
        target = f"{dest_host}:{dest_port}"
        gw = self.gw

        def closed(splice: Splice) -> None:
            gw.spawn(gw.authority.channel_closed(self.session, target, splice.a.bytes_in,
                                                 splice.b.bytes_in), "channel-closed")

        splice = Splice("engineer", "agent", on_close=closed)

        async def open_relay() -> Any:
            live = await self._target_check(dest_host, dest_port)
            await self._agent_channel(live, dest_host, dest_port, lambda: splice.b)
            await gw.authority.audit(self.session, "channel.opened",
                                     {"target": target, "peer": self.peer})
            return splice.a

        return open_relay()

    def session_requested(self) -> Any:
        """A shell or a command: relayed to the agent's restricted shell, recorded."""
        shell = ShellRelay(self)

        async def open_shell() -> Any:
            live = await self._target_check(SHELL_TARGET, SHELL_PORT)
            shell.agent_session = await self._agent_channel(live, SHELL_TARGET, SHELL_PORT,
                                                            shell.agent_end)
            live.shells += 1
            shell.number = live.shells
            return shell

        return open_shell()


class AgentShellEnd:
    """The agent's side of a shell: frames in, the engineer's channel out."""

    def __init__(self, relay: ShellRelay) -> None:
        self.relay = relay
        self.chan: Any = None
        self.decoder = FrameDecoder()

    def connection_made(self, chan: Any) -> None:
        """The forwarded channel to the agent is open."""
        self.chan = chan

    def session_started(self) -> None:
        """Nothing to do."""

    def data_received(self, data: bytes, _datatype: Any = None) -> None:
        """Frames from the agent's shell."""
        try:
            frames = self.decoder.feed(data)
        except SessionError as exc:
            log.warning("gateway: bad frame from agent: %s", exc)
            self.relay.finish(255)
            return
        for frame in frames:
            if frame.type is FrameType.STDOUT:
                self.relay.output(frame.payload, stderr=False)
            elif frame.type is FrameType.STDERR:
                self.relay.output(frame.payload, stderr=True)
            elif frame.type is FrameType.EXIT:
                self.relay.finish(frame.exit_status())

    def eof_received(self) -> bool:
        """The agent is done sending."""
        return False

    def connection_lost(self, _exc: Exception | None) -> None:
        """The agent's channel went: end the engineer's too."""
        self.relay.finish(None)

    def pause_writing(self) -> None:
        """Shell traffic is small; no back-pressure."""

    def resume_writing(self) -> None:
        """Shell traffic is small; no back-pressure."""

    def write(self, data: bytes) -> None:
        """Send a frame to the agent."""
        if self.chan is not None:
            self.chan.write(data)

    def close(self) -> None:
        """Close the agent's channel."""
        if self.chan is not None:
            self.chan.close()


class ShellRelay(asyncssh.SSHServerSession[bytes]):
    """The engineer's session channel: a shell or a command, relayed as frames and recorded."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.agent = AgentShellEnd(self)
        self.agent_session: Any = None
        self.number = 0
        self.term: str | None = None
        self.size = (80, 24)
        self.command: str | None = None
        self.recording: Recording | None = None
        self.finished = False

    def agent_end(self) -> AgentShellEnd:
        """Factory for the agent-side session of the forwarded channel."""
        return self.agent

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        """The engineer's channel is open."""
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Any) -> bool:
        """Accept a terminal; its size goes to the agent and into the recording."""
        self.term = term_type
        if term_size[0] and term_size[1]:
            self.size = (term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        """An interactive shell."""
        return True

    def exec_requested(self, command: str) -> bool:
        """One command."""
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        """No sftp or other subsystems."""
        return False

    def session_started(self) -> None:
        """Tell the agent what to run, and start recording."""
        cols, rows = self.size
        title = f"session {self.conn.session} shell {self.number}"
        self.recording = Recording(
            name=f"shell-{self.number}.cast", started=self.conn.gw.clock.now(),
            header=asciicast_header(cols, rows, self.conn.gw.clock.now(), title, self.term))
        if self.command is not None:
            self.recording.add("i", (self.command + "\n").encode())
        self.agent.write(json_frame(FrameType.REQUEST, {
            "command": self.command, "term": self.term, "cols": cols, "rows": rows}))
        self.conn.gw.spawn(self.conn.gw.authority.audit(
            self.conn.session, "shell.opened",
            {"command": self.command, "pty": self.term is not None, "peer": self.conn.peer}),
            "audit")

    def data_received(self, data: bytes, datatype: Any) -> None:
        """Keystrokes: recorded, sent to the agent."""
        if self.recording is not None:
            self.recording.add("i", data)
        for frame in data_frames(FrameType.STDIN, data):
            self.agent.write(frame)

    def eof_received(self) -> bool:
        """The engineer closed stdin; keep the output flowing."""
        self.agent.write(encode_frame(FrameType.STDIN_EOF))
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        """Pass a resize on."""
        self.agent.write(json_frame(FrameType.WINDOW, {"cols": width, "rows": height}))

    def output(self, data: bytes, *, stderr: bool) -> None:
        """Output from the agent's shell: to the engineer and into the recording."""
        if self.recording is not None:
            self.recording.add("o", data)
        if self.chan is None:
            return
        if stderr:
            self.chan.write_stderr(data)
        else:
            self.chan.write(data)

    def finish(self, status: int | None) -> None:
        """The shell ended (or its channel went): exit the engineer's channel, keep the cast."""
        if self.finished:
            return
        self.finished = True
        if self.chan is not None:
            if status is None:
                self.chan.close()
            else:
                self.chan.exit(status)
        self.agent.close()
        recording = self.recording
        if recording is not None:
            gw = self.conn.gw
            gw.spawn(gw.authority.store_recording(self.conn.session, recording), "recording")

    def connection_lost(self, exc: Exception | None) -> None:
        """The engineer left: end the agent's side too."""
        self.finish(None)


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The gateway's host key from `path`, generated (Ed25519, mode 0600) on first use."""
    if path.exists():
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="emu-gateway")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.export_private_key("openssh")
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_bytes(data)
    tmp.replace(path)
    return key
