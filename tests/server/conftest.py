"""A migrated database per test session (fresh PostgreSQL database in CI, else SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from server.core.db import Database, migrate_sync
from tests.support.database import fresh_database


@pytest.fixture(scope="session")
def server_db_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a migrated, initially empty database shared by the session's server tests."""
    with fresh_database(database_url, tmp_path_factory.mktemp("server-db")) as url:
        migrate_sync(url)
        yield url


@pytest.fixture
async def db(server_db_url: str) -> AsyncIterator[Database]:
    """The database, through the server's own engine and sessions."""
    database = Database(server_db_url)
    yield database
    await database.close()
