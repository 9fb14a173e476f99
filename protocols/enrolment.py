"""The enrolment answer: what the server hands an agent for a valid one-time token.

One definition for both ends (the server builds it, the agent stores it in its settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Credentials:
    """An agent's own broker identity; the user name is its site code."""

    site: str
    agent_id: str
    username: str
    password: str = field(repr=False)
    broker_url: str | None = None
    ca_pem: str | None = None
    command_key: str | None = None
    """The server's command public key (base64 Ed25519) the agent must trust."""
    gateway: str | None = None
    """`host:port` of the remote-session SSH gateway the agent dials out to."""
    gateway_host_key: str | None = None
    """The gateway's OpenSSH host key (`type base64`), pinned by the agent."""
