"""Byte splicing between two flow-controlled transports (SSH channels or TCP sockets).

The gateway splices an engineer's channel to the agent's channel; the agent splices that
channel to a unit's TCP socket. Both sides are driven by callbacks (asyncssh sessions and
asyncio protocols share the same shape), so a splice copies each chunk once, with no task per
direction, and applies back-pressure: when one side's write buffer fills, the other side
stops reading until it drains. Bytes are counted per direction for the session's record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol


class Transport(Protocol):
    """What asyncssh channels and asyncio transports both offer."""

    def write(self, data: Any) -> None:
        """Queue bytes."""

    def write_eof(self) -> None:
        """Half-close the sending direction."""

    def close(self) -> None:
        """Close both directions."""

    def pause_reading(self) -> None:
        """Stop delivering data."""

    def resume_reading(self) -> None:
        """Deliver data again."""


class End(asyncio.Protocol):
    """One side of a splice: the protocol/session object its transport calls back."""

    def __init__(self, splice: Splice, name: str) -> None:
        self.splice = splice
        self.name = name
        self.transport: Transport | None = None
        self.peer: End | None = None
        self.pending: list[bytes] = []
        self.pending_eof = False
        self.eof_in = False
        self.bytes_in = 0
        self.closed = False

    # asyncio.Protocol / asyncssh SSHTCPSession callbacks ------------------------------------

    def connection_made(self, transport: Any) -> None:
        """The transport is ready: flush what the peer sent before."""
        self.transport = transport
        pending, self.pending = self.pending, []
        for chunk in pending:
            transport.write(chunk)
        if self.pending_eof:
            self._write_eof()

    def data_received(self, data: bytes, *_datatype: Any) -> None:
        """Forward to the peer."""
        self.bytes_in += len(data)
        if self.splice.on_data is not None:
            self.splice.on_data(self.name, data)
        peer = self.peer
        if peer is None or peer.closed:
            return
        if peer.transport is None:
            peer.pending.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        """Half-close towards the peer; keep our own sending direction open."""
        self.eof_in = True
        if self.peer is not None:
            self.peer.send_eof()
        if self.peer is not None and self.peer.eof_in:
            self.splice.close()
        return True

    def connection_lost(self, _exc: Exception | None = None) -> None:
        """One side went away: close the other."""
        self.closed = True
        self.splice.close()

    def pause_writing(self) -> None:
        """Our send buffer is full: stop reading the peer."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        """Drained: read the peer again."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # asyncssh session extras ----------------------------------------------------------------

    def session_started(self) -> None:
        """asyncssh calls this after connection_made; nothing to do."""

    # ------------------------------------------------------------------------------------------

    def send_eof(self) -> None:
        """Half-close towards this end's transport (now or once it is ready)."""
        if self.transport is None:
            self.pending_eof = True
        else:
            self._write_eof()

    def _write_eof(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):  # e.g. a closing transport
            self.transport.close()

    def close(self) -> None:
        """Close this end's transport."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.closed = True


class Splice:
    """Two ends copying into each other; `on_close(splice)` runs once when either goes."""

    def __init__(self, a_name: str = "a", b_name: str = "b",
                 on_close: Callable[[Splice], None] | None = None,
                 on_data: Callable[[str, bytes], None] | None = None) -> None:
        self.a = End(self, a_name)
        self.b = End(self, b_name)
        self.a.peer, self.b.peer = self.b, self.a
        self.on_close = on_close
        self.on_data = on_data
        self.done = False

    def close(self) -> None:
        """Close both ends (idempotent)."""
        if self.done:
            return
        self.done = True
        self.a.close()
        self.b.close()
        if self.on_close is not None:
            self.on_close(self)
