"""A TCP forwarder on a loopback port that a test can cut and restore: a broker outage on demand.

The shared Mosquitto cannot be stopped by a test, so the agent talks to the broker through a
`TcpProxy`; `cut()` aborts every forwarded connection and closes the listening socket, so new
connections are refused exactly as by a stopped broker, and `restore()` listens again on the same
port. Everything else (a subscriber, the test's own checks) talks to the broker directly.

`bytes_down` counts what went from the target to the clients (bytes on the wire of a
download); with `cut_after_bytes` the proxy drops its connections once, when that many bytes
have gone down, and forwards normally afterwards (a download cut half-way, then resumed).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from tests.support.net import LOOPBACK

_BUFFER = 64 * 1024
_CONNECT_TIMEOUT = 5.0


class TcpProxy:
    """Forward `host:port` (port 0 picks a free one) to `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int, host: str = LOOPBACK,
                 cut_after_bytes: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.bytes_down = 0
        self.cut_after_bytes = cut_after_bytes
        self.host = host
        self.port = 0
        self.accepted = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """`mqtt://host:port` of the proxy, for the client that should go through it."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        """Whether the proxy refuses connections right now."""
        return self._server is None

    @property
    def connections(self) -> int:
        """Forwarded connections open right now."""
        return len(self._transports) // 2

    async def start(self) -> None:
        """Listen (again, on the same port after a cut)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Abort every forwarded connection and refuse new ones until `restore`."""
        self.cuts += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()  # both ends see the connection drop; the pumps then end
        self._transports.clear()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CONNECT_TIMEOUT)
            assert not pending, f"{len(pending)} proxy connection(s) did not end after a cut"
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        await self.start()

    async def close(self) -> None:
        """Stop for good."""
        await self.cut()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._transports.add(writer.transport)
        self.accepted += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._transports.add(up_writer.transport)
            await asyncio.gather(_pump(reader, up_writer), self._pump_down(up_reader, writer))
        except (OSError, TimeoutError):
            pass  # the target refused or is not there: the client sees its connection close
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._transports.discard(w.transport)
                    w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pump_down(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """Target to client, counting bytes and cutting once at `cut_after_bytes`."""
        try:
            while data := await reader.read(_BUFFER):
                limit = self.cut_after_bytes
                if limit is not None and self.bytes_down + len(data) >= limit:
                    data = data[: limit - self.bytes_down]
                    self.bytes_down += len(data)
                    writer.write(data)
                    await writer.drain()
                    self.cut_after_bytes = None
                    self.cuts += 1
                    for transport in list(self._transports):
                        transport.abort()
                    return
                self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            writer.transport.abort()
            return
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes one way until EOF, then half-close the other side; drop it on an error."""
    try:
        while data := await reader.read(_BUFFER):
            writer.write(data)
            await writer.drain()
    except OSError:
        writer.transport.abort()  # so that the other direction ends too
        return
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
