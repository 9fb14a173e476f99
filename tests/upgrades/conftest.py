"""Fixtures of the upgrade tests: a release key, an API server, a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from protocols.clock import ManualClock
from protocols.signing import Ed25519PrivateKey, generate_private_key
from server.core.db import migrate_sync
from tests.support.database import fresh_database
from tests.upgrades.world import START, Api, add_user, api_server, make_org


@pytest.fixture(scope="session")
def release_key() -> Ed25519PrivateKey:
    """The release manager's signing key for this test session."""
    return generate_private_key()


@pytest.fixture(scope="session")
def upgrades_db_url(database_url: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database for the upgrade tests (PostgreSQL in CI)."""
    with fresh_database(database_url, tmp_path_factory.mktemp("upgrades-db")) as url:
        migrate_sync(url)
        yield url


@pytest.fixture(scope="session")
def server_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's data dir, kept for the session like the database that points into it
    (an upload of bytes already stored returns the stored release)."""
    return tmp_path_factory.mktemp("upgrades-data")


@pytest.fixture
def clock() -> ManualClock:
    """Server and agents' wall clock."""
    return ManualClock(START)


@pytest.fixture
async def api(upgrades_db_url: str, server_data_dir: Path, release_key: Ed25519PrivateKey,
              clock: ManualClock) -> AsyncIterator[Api]:
    """The API on a real port with an admin and a customer (of a fresh organisation)."""
    async with api_server(upgrades_db_url, server_data_dir, release_key, clock) as a:
        _, a.tokens["admin"] = await add_user(a.db, "admin")
        org = await make_org(a.db)
        a.org_id = org
        a.tokens["customer_user_id"], a.tokens["customer"] = (
            str(x) for x in await add_user(a.db, "customer", org))
        _, a.tokens["stranger"] = await add_user(a.db, "customer", await make_org(a.db))
        yield a
