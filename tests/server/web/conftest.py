"""The dashboard tests' world: the API tests' seeded world, whose users can log in."""

from __future__ import annotations

import pytest

from server.core.db import Database
from tests.server.test_api_common import World, seed_world
from tests.server.web.helpers import give_password, name_of


@pytest.fixture
async def world(db: Database) -> World:
    """The seeded world; its customers (both organisations), admin and engineer get the test
    password (only theirs: the session's database holds other tests' users too)."""
    w = await seed_world(db)
    for user_id in (w.own.user_id, w.other.user_id, w.admin_id, w.engineer_id):
        await give_password(db, await name_of(db, user_id))
    return w
