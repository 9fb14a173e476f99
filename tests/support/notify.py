"""Local receivers for notifications: an SMTP sink (aiosmtpd) and a webhook receiver.

Both listen on 127.0.0.1, port 0, in the test's event loop, and keep what arrives, so a test
can count every email and every webhook call (e.g. "each notification exactly once").
"""

from __future__ import annotations

import asyncio
import json
from email import message_from_bytes
from email.message import Message
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        raw = envelope.content if isinstance(envelope.content, bytes) else b""
        self.sink.messages.append(message_from_bytes(raw))
        return "250 OK"


class SmtpSink:
    """A real SMTP server that accepts every message and keeps it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        self._server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def subjects(self) -> list[str]:
        """Subjects of the messages so far."""
        return [str(m["Subject"]) for m in self.messages]


class WebhookReceiver:
    """A minimal HTTP/1.1 server: every POST body (JSON) is kept and answered 200."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """Where to POST."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length)
            self.calls.append(json.loads(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            await writer.wait_closed()
