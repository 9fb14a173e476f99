"""The embedded MQTT broker of `emu demo` (amqtt, in-process, loopback only).

amqtt speaks MQTT 3.1.1 and has no shared subscriptions, so it is for a single machine: the
demo and the test fallback. Production runs Mosquitto or EMQX (deploy/).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from amqtt.broker import Broker


class ClosingBroker(Broker):  # type: ignore[misc]  # amqtt has no type hints: Broker is Any
    """amqtt's Broker, closing each client stream when its connection handler returns.

    amqtt 0.12 drains before closing a client's writer and skips the close when the drain fails
    or is cancelled (the client already hung up), leaking the socket.
    """

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """Serve one client, then make sure its socket is closed."""
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            writer.close()


def broker_config(host: str, port: int) -> dict[str, Any]:
    """A loopback listener with anonymous access and no $SYS plugin (it warns about psutil)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


@asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[None]:
    """Run the broker on this event loop for the duration of the block."""
    broker = ClosingBroker(broker_config(host, port))
    await broker.start()
    try:
        yield
    finally:
        await broker.shutdown()
