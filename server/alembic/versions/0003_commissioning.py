"""commissioning plans, documents, runs, on-site results

Revision ID: 0003_commissioning
Revises: 0002_tickets_sla
Create Date: 2026-11-25 17:55:28.568701
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import server.models

revision: str = '0003_commissioning'
down_revision: str | None = '0002_tickets_sla'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply."""
    op.create_table('commissioning_plan',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('mode', sa.String(length=10), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('visits', sa.Integer(), nullable=False),
    sa.Column('starts_on', sa.Date(), nullable=True),
    sa.Column('ends_on', sa.Date(), nullable=True),
    sa.Column('technicians', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('equipment', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('targets', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('checklist', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('notes', sa.Text(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=True),
    sa.Column('created_by', sa.String(length=100), nullable=True),
    sa.Column('created_at', server.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', server.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('issued_at', server.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('issued_by', sa.String(length=100), nullable=True),
    sa.Column('acknowledged_at', server.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('acknowledged_by', sa.String(length=100), nullable=True),
    sa.Column('completed_at', server.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['site.id'], ),
    sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('commissioning_plan', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commissioning_plan_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_commissioning_plan_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_commissioning_plan_ticket_id'), ['ticket_id'], unique=False)

    op.create_table('commissioning_document',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('html', sa.Text(), nullable=False),
    sa.Column('pdf', sa.LargeBinary(), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', server.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['plan_id'], ['commissioning_plan.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('plan_id', 'kind', 'version')
    )
    with op.batch_alter_table('commissioning_document', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commissioning_document_plan_id'), ['plan_id'], unique=False)

    op.create_table('commissioning_onsite_result',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=False),
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('series', sa.String(length=32), nullable=True),
    sa.Column('check', sa.String(length=64), nullable=False),
    sa.Column('passed', sa.Boolean(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('evidence', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('technician', sa.String(length=100), nullable=False),
    sa.Column('recorded_at', server.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['plan_id'], ['commissioning_plan.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('commissioning_onsite_result', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commissioning_onsite_result_plan_id'), ['plan_id'], unique=False)

    op.create_table('commissioning_run',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('command_id', sa.String(length=64), nullable=True),
    sa.Column('requested_by', sa.String(length=100), nullable=True),
    sa.Column('requested_at', server.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', server.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('progress', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('outcome', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['plan_id'], ['commissioning_plan.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('commissioning_run', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commissioning_run_command_id'), ['command_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_commissioning_run_plan_id'), ['plan_id'], unique=False)



def downgrade() -> None:
    """Revert."""
    with op.batch_alter_table('commissioning_run', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commissioning_run_plan_id'))
        batch_op.drop_index(batch_op.f('ix_commissioning_run_command_id'))

    op.drop_table('commissioning_run')
    with op.batch_alter_table('commissioning_onsite_result', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commissioning_onsite_result_plan_id'))

    op.drop_table('commissioning_onsite_result')
    with op.batch_alter_table('commissioning_document', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commissioning_document_plan_id'))

    op.drop_table('commissioning_document')
    with op.batch_alter_table('commissioning_plan', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commissioning_plan_ticket_id'))
        batch_op.drop_index(batch_op.f('ix_commissioning_plan_state'))
        batch_op.drop_index(batch_op.f('ix_commissioning_plan_site_id'))

    op.drop_table('commissioning_plan')
