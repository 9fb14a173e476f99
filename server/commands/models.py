"""The `command` table: every order sent to an agent, and its last known outcome."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.models import JSONType, UTCDateTime, utcnow

FINAL_STATES = frozenset({"ok", "error", "rejected", "expired"})


class CommandRecord(SQLModel, table=True):
    """One command; `state` pending -> sent -> progress* -> ok|error|rejected|expired."""

    __tablename__ = "command"

    id: str = Field(primary_key=True, max_length=36)
    site_id: int = Field(foreign_key="site.id", index=True)
    kind: str = Field(max_length=32, index=True)
    args: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    payload: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    state: str = Field(default="pending", max_length=16, index=True)
    issued_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    sends: int = 0
    acked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    progress: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    result: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    created_by: int | None = Field(default=None, foreign_key="user.id")
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)

    @property
    def final(self) -> bool:
        """Nothing more will happen to it."""
        return self.state in FINAL_STATES
