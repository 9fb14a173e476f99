"""Alembic environment: migrations run with a synchronous driver on the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool, text
from sqlmodel import SQLModel

import server.commands.models
import server.commissioning.models
import server.models
import server.sessions.models
import server.sla.models
import server.tickets.models
import server.upgrades.models  # noqa: F401  (each module registers its tables on SQLModel.metadata)

MIGRATION_LOCK = 0x454D55_0001
"""pg_advisory_xact_lock key that serialises concurrent `emu server migrate` runs."""

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    """Emit SQL without a database connection (`alembic upgrade --sql`)."""
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the database."""
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Several server processes may start (and migrate) at once: one migrates, the
                # others wait here and then find the schema at head (DDL is transactional).
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
