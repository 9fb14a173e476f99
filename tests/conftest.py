"""Fixtures for the real services every test layer shares: MQTT broker and database.

`EMU_TEST_MQTT_URL` / `EMU_TEST_DATABASE_URL` (set by `.ci/run`) select Mosquitto and
PostgreSQL; without them the suite falls back to an in-process amqtt broker and SQLite.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from tests.support.broker import BrokerInfo, EmbeddedBroker, external_broker
from tests.support.database import external_database, sqlite_url

MQTT_URL_ENV = "EMU_TEST_MQTT_URL"
DATABASE_URL_ENV = "EMU_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[BrokerInfo]:
    """The MQTT broker for this test session: external if `EMU_TEST_MQTT_URL`, else amqtt."""
    url = os.environ.get(MQTT_URL_ENV)
    if url:
        yield external_broker(url)
        return
    broker = EmbeddedBroker()
    info = broker.start()
    try:
        yield info
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SQLAlchemy URL of the test database: `EMU_TEST_DATABASE_URL`, else a SQLite file.

    Session-scoped like the PostgreSQL database it stands for: tests must not rely on starting
    from an empty database, only on the schema and rows they create themselves.
    """
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return external_database(url)
    return sqlite_url(tmp_path_factory.mktemp("db"))


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so that a leaked socket is blamed on the test that leaked it."""
    yield
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _server_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers built without an explicit `data_dir` keep keys and files in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMU_DATA_DIR", str(tmp_path_factory.mktemp("emu-data")))
        yield
