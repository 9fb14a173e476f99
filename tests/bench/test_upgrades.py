"""Benchmarks of the upgrade service.

1. **Rollout of 200 units on 20 sites** (10 simulated EMU-BS units per site, one executor per
   site, the real API serving the packages through a byte-counting proxy, the rollout engine
   ticking every 50 ms, jobs handed over in-process as in tests/upgrades/test_rollout.py).
   Baseline, measured in the same run: one unit upgraded alone by the same executor (download
   excluded, image already kept), `t1`. The ideal wall time for the concurrency limits is, per
   wave, the number of rounds the limits force (`max(ceil(n / total), max over sites of
   ceil(n_site / per_site))`) times `t1`, summed over the waves. Printed: wall time, ideal,
   their ratio; bytes on the wire against the ideal of one download of the package and one of
   the previous image (kept for rollback) per site.
2. **Delta against full** for a small change (a 256 KiB image, 63 bytes changed in three
   places, 300 bytes inserted so that the rest shifts, new version string): delta size / full
   size, goal <= 0.2.

Run: `pytest -m bench tests/bench/test_upgrades.py -s`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from protocols.clock import ManualClock
from protocols.firmware import FirmwareImage
from protocols.packages import build_delta, build_full
from protocols.signing import Ed25519PrivateKey, generate_private_key
from server.core.db import migrate_sync
from server.upgrades.rollout import RolloutEngine
from tests.support.database import fresh_database
from tests.support.proxy import TcpProxy
from tests.upgrades.world import (
    START,
    Loopback,
    add_user,
    api_server,
    firmware,
    make_org,
    make_site,
    signed,
    upload,
)

pytestmark = pytest.mark.bench

SITES = 20
UNITS = 10
IMAGE = 16 * 1024
PER_SITE = 2
TOTAL = 20
WAVES = [10, 50, 100]


def ideal_rounds(targets: list[tuple[int, int]]) -> int:
    """Rounds the concurrency limits force, summed over waves; targets are (wave, site)."""
    rounds = 0
    for wave in sorted({w for w, _ in targets}):
        per_site = Counter(s for w, s in targets if w == wave)
        n = sum(per_site.values())
        rounds += max(math.ceil(n / TOTAL), max(math.ceil(c / PER_SITE)
                                                for c in per_site.values()))
    return rounds


async def test_rollout_200_units_20_sites(tmp_path: Path, database_url: str) -> None:
    key: Ed25519PrivateKey = generate_private_key()
    clock = ManualClock(START)
    v100, v110 = firmware("1.0.0", size=IMAGE), firmware("1.1.0", size=IMAGE, change=64)
    (tmp_path / "db").mkdir()
    with fresh_database(database_url, tmp_path / "db") as url:
        migrate_sync(url)
        async with api_server(url, tmp_path / "srv", key, clock) as api:
            _, api.tokens["admin"] = await add_user(api.db, "admin")
            org = await make_org(api.db)
            api.org_id = org
            _, api.tokens["customer"] = await add_user(api.db, "customer", org)
            ids = {}
            for name, pkg in (("1.0.0", signed(v100, key)), ("1.1.0", signed(v110, key))):
                ids[name] = (await upload(api, pkg)).json()["id"]
            host, port = api.url.removeprefix("http://").split(":")
            async with TcpProxy(host, int(port)) as proxy:
                rigs = [await make_site(api.db, org, UNITS, tmp_path / f"gw{i}", key, clock,
                                        timeout_s=5.0)
                        for i in range(SITES)]
                base = f"http://127.0.0.1:{proxy.port}"
                try:
                    t1 = await _single_install_time(rigs[0], v110, key, clock)
                    for r in rigs:  # back to a fresh gateway state for the rollout
                        r.executor.stats.installs = 0
                    loop = Loopback(api.db, {r.site_id: r for r in rigs})
                    engine = RolloutEngine(api.settings, api.db, loop.send, clock=clock,
                                           base_url=lambda: base)
                    loop.engine = engine
                    async with api.client() as admin, api.client("customer") as cust:
                        day = (clock.now() + timedelta(days=1)).date().isoformat()
                        resp = await admin.post("/plans", json={
                            "title": "bench", "release_id": ids["1.1.0"],
                            "site_ids": [x.site_id for x in rigs],
                            "windows": [{"start": f"{day}T00:00", "end": f"{day}T23:00"}],
                            "canary": 1, "wave_percentages": WAVES,
                            "concurrency_per_site": PER_SITE, "concurrency_total": TOTAL,
                            "settle_s": 0.2, "failure_threshold": 5})
                        pid = resp.json()["id"]
                        await admin.post(f"/plans/{pid}/issue")
                        await cust.post(f"/plans/{pid}/confirm", json={
                            "window": 0, "personnel": ["x"], "signature": "x"})
                        await admin.post(f"/plans/{pid}/schedule")
                        clock.advance((datetime.fromisoformat(f"{day}T00:00:00+00:00")
                                       - clock.now()).total_seconds())
                        before = proxy.bytes_down
                        started = time.monotonic()
                        while True:
                            await engine.tick()
                            loop.pump()
                            plan = (await admin.get(f"/plans/{pid}")).json()
                            if plan["state"] not in ("scheduled", "running"):
                                break
                            await asyncio.sleep(0.05)
                        wall = time.monotonic() - started
                        targets = (await admin.get(f"/rollouts/{pid}")).json()
                    await loop.close()
                    wire = proxy.bytes_down - before
                finally:
                    for r in rigs:
                        await r.close()
    assert plan["state"] == "completed", (plan["halted_reason"], plan["counts"])
    rounds = ideal_rounds([(t["wave"], t["site_id"]) for t in targets])
    ideal = rounds * t1
    pkg_bytes = len(v110) + len(v100)
    print(f"\nrollout: {len(targets)} units on {SITES} sites, waves canary+{WAVES}, "
          f"per site {PER_SITE}, total {TOTAL}")
    print(f"  one unit alone (baseline t1): {t1:.2f} s; ideal {rounds} rounds = {ideal:.1f} s")
    print(f"  wall time {wall:.1f} s = {wall / ideal:.2f} x ideal")
    print(f"  bytes on the wire {wire} = {wire / (SITES * pkg_bytes):.3f} x ideal "
          f"({SITES} sites x (package {len(v110)} + previous {len(v100)}))")


async def _single_install_time(rig: object, image: bytes, key: Ed25519PrivateKey,
                               clock: ManualClock) -> float:
    """One unit upgraded alone, image already kept: the install, reboot and settle only."""
    from protocols.packages import PackageRef, UpgradeJob
    from tests.upgrades.world import SiteRig

    assert isinstance(rig, SiteRig)
    pkg = signed(image, key)
    await rig.executor._keep(pkg.manifest, image)
    import base64

    job = UpgradeJob(plan_id=0, target_id=0, device="bs-1", window_start=clock.now(),
                     window_end=clock.now() + timedelta(hours=1), settle_s=0.2,
                     package=PackageRef(url="http://unused", manifest=pkg.manifest,
                                        signature=base64.b64encode(pkg.signature or b"")
                                        .decode()))

    async def progress(_: dict[str, object]) -> None:
        return None

    started = time.monotonic()
    await rig.executor.run(job.model_dump(mode="json"), progress)
    took = time.monotonic() - started
    unit = rig.sim.unit(1)
    unit.firmware.version = "1.0.0"  # back, so that the rollout upgrades it like the others
    return took


def test_delta_size_for_a_small_change() -> None:
    size = 256 * 1024
    old = firmware("2.0.0", size=size)
    fw = FirmwareImage.parse(firmware("2.0.1", size=size))
    payload = bytearray(fw.payload)
    for at in (1000, size // 2, size - 5000):  # three small patches, 63 bytes in all
        for i in range(21):
            payload[at + i] ^= 0x3C
    insert = bytes(range(256)) + bytes(range(44))  # 300 new bytes: everything after shifts
    payload[size // 3 : size // 3] = insert
    new = FirmwareImage(fw.series, "2.0.1", bytes(payload)).to_bytes()
    now = datetime.now(UTC)
    full = build_full(new, created_at=now)
    started = time.perf_counter()
    delta = build_delta(old, new, created_at=now)
    took = time.perf_counter() - started
    ratio = delta.manifest.size / full.manifest.size
    print(f"\ndelta: image {full.manifest.size} bytes, 63 bytes changed in 3 places, 300 "
          f"inserted, new version;"
          f" delta {delta.manifest.size} bytes = {ratio:.4f} x full (goal <= 0.2); "
          f"built in {took:.2f} s")
    assert ratio <= 0.2
