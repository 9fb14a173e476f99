"""Fixtures of the remote-session tests: a simulator with one port per unit, the rig."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocols.clock import ManualClock
from server.core.db import Database
from simulators.server import SimConfig, Simulator
from tests.server.sessions.harness import SSH, Rig, session_rig

if shutil.which(SSH) is None:  # pragma: no cover - CI installs openssh-client
    pytest.skip("the OpenSSH client is not installed", allow_module_level=True)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """Two simulated units, each on its own port (unit id 1)."""
    async with Simulator(SimConfig(units=2, port=0, one_port_per_unit=True,
                                   profiles=["EMU-BS", "EMU-PV"], refresh_s=3600)) as s:
        yield s


@pytest.fixture
def clock() -> ManualClock:
    """Session rules run on this clock; tests move it to expire things."""
    return ManualClock()


@pytest.fixture
async def rig(db: Database, tmp_path: Path, clock: ManualClock,
              sim: Simulator) -> AsyncIterator[Rig]:
    """Gateway, agent and a seeded site (customer approval)."""
    async with session_rig(db, tmp_path, clock, sim) as r:
        yield r
