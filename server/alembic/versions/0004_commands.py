"""command table: signed orders to agents and their outcome

Revision ID: 0004_commands
Revises: 0003_commissioning
Create Date: 2026-11-25 17:44:18.548060
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import server.models

revision: str = "0004_commands"
down_revision: str | None = "0003_commissioning"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply."""
    op.create_table(
        "command",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "args",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("issued_at", server.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", server.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent_at", server.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("acked_at", server.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "progress",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "result",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column("updated_at", server.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["user.id"],
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["site.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("command", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_command_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_command_site_id"), ["site_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_command_state"), ["state"], unique=False)


def downgrade() -> None:
    """Revert."""
    with op.batch_alter_table("command", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_command_state"))
        batch_op.drop_index(batch_op.f("ix_command_site_id"))
        batch_op.drop_index(batch_op.f("ix_command_kind"))

    op.drop_table("command")
