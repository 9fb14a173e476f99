"""`emu demo`: one command, nothing else running, no settings — the README's first command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from emu.demo import DemoLogins, run_demo
from tests.support.net import free_tcp_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


async def test_demo_runs_and_shows_live_data(tmp_path: Path) -> None:
    stop = asyncio.Event()
    seen: dict[str, object] = {}
    up = asyncio.Event()

    def ready(url: str, logins: DemoLogins) -> None:
        seen["url"], seen["logins"] = url, logins
        up.set()

    demo = asyncio.create_task(run_demo(0, tmp_path, stop, fault_every_s=2.0, ready=ready,
                                        poll_interval_s=0.5))
    try:
        await wait_for(up.wait(), 60, "the demo to come up")
        logins = seen["logins"]
        assert isinstance(logins, DemoLogins)
        assert set(logins.tokens) == {"admin", "engineer", "release", "sunrise", "harbour"}
        assert set(logins.passwords) == set(logins.tokens)
        async with httpx.AsyncClient(base_url=str(seen["url"]), timeout=10) as api:
            admin = {"Authorization": f"Bearer {logins.tokens['admin']}"}

            async def units() -> list[dict[str, object]] | None:
                data = (await api.get("/api/v1/units", headers=admin)).json()["data"]
                return data if len(data) == 4 else None

            found = await wait_for(units, 60, "the four demo units reporting")
            assert found is not None
            unit_id = found[0]["id"]

            async def points() -> bool:
                r = await api.get(f"/api/v1/units/{unit_id}/points", headers=admin)
                return r.status_code == 200 and len(r.json()) > 10

            await wait_for(points, 30, "live telemetry of a demo unit")
            customer = {"Authorization": f"Bearer {logins.tokens['sunrise']}"}
            sites = (await api.get("/api/v1/sites", headers=customer)).json()["data"]
            assert [s["code"] for s in sites] == ["site-sunrise"]

            async def issued_plan() -> bool:  # the tour's release and written plan
                r = await api.get("/api/v1/plans", headers=customer)
                return any(p["state"] == "issued" for p in r.json()["data"])

            await wait_for(issued_plan, 90, "the tour's issued upgrade plan")
    finally:
        stop.set()
        await wait_for(demo, 60, "the demo to stop")


async def test_demo_command_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_tcp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emu", "demo", "--port", str(port), "--data-dir",
        str(tmp_path / "data"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    out = b""
    try:
        while b"Ctrl-C stops the demo" not in out:
            line = await wait_for(proc.stdout.readline(), 60, "the demo's banner")
            assert line, out.decode()
            out += line
        assert f"http://127.0.0.1:{port}".encode() in out
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = await wait_for(proc.communicate(), 60, "the demo to stop")
    assert proc.returncode == 0, (out + rest).decode()
    assert b"demo stopped" in rest
