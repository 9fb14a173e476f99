"""Tables of remote sessions: the session, engineers' and agents' SSH keys, audit, recordings.

`RemoteSession.id` is a random public id (`s` + 12 hex digits) because it is also the SSH
user name the engineer types. `SessionAudit` is append-only and hash-chained per session
(protocols/sessions.py); `(session_id, seq)` is unique, so two writers cannot fork a chain.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.models import JSONType, UTCDateTime, utcnow


class RemoteSession(SQLModel, table=True):
    """One consent-gated remote session for a ticket."""

    __tablename__ = "remote_session"

    id: str = Field(primary_key=True, max_length=16)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    engineer_id: int = Field(foreign_key="user.id", index=True)
    reason: str = Field(sa_type=sa.Text)
    scope: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    max_duration_s: int
    approval: str = Field(default="customer", max_length=16)
    state: str = Field(default="requested", max_length=16, index=True)
    requested_at: datetime = Field(sa_type=UTCDateTime)
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    decided_by: str | None = Field(default=None, max_length=100)
    claim_by: datetime | None = Field(default=None, sa_type=UTCDateTime)
    first_connected_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    ends_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    end_reason: str | None = Field(default=None, max_length=200)
    forwarded: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    command_id: str | None = Field(default=None, max_length=64)


class SshKey(SQLModel, table=True):
    """An engineer's public key for the gateway (OpenSSH `type base64`)."""

    __tablename__ = "ssh_key"
    __table_args__ = (sa.UniqueConstraint("user_id", "public_key"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    name: str = Field(default="key", max_length=100)
    public_key: str = Field(max_length=2000)
    fingerprint: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class AgentSshKey(SQLModel, table=True):
    """The key an enrolled agent dials the gateway with (one per agent, replaced on re-enrol)."""

    __tablename__ = "agent_ssh_key"

    id: int | None = Field(default=None, primary_key=True)
    agent_id: int = Field(foreign_key="agent.id", unique=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    public_key: str = Field(max_length=2000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class SessionAudit(SQLModel, table=True):
    """One entry of a session's hash-chained audit log."""

    __tablename__ = "session_audit"
    __table_args__ = (sa.UniqueConstraint("session_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(foreign_key="remote_session.id", index=True, max_length=16)
    seq: int
    ts: datetime = Field(sa_type=UTCDateTime)
    kind: str = Field(max_length=40)
    actor: str | None = Field(default=None, max_length=100)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class SessionRecording(SQLModel, table=True):
    """A shell channel's asciicast v2 recording."""

    __tablename__ = "session_recording"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(foreign_key="remote_session.id", index=True, max_length=16)
    name: str = Field(max_length=100)
    started_at: datetime = Field(sa_type=UTCDateTime)
    ended_at: datetime = Field(sa_type=UTCDateTime)
    sha256: str = Field(max_length=64)
    truncated: bool = False
    cast: str = Field(sa_type=sa.Text)
