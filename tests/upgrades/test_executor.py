"""The agent's upgrade executor, called directly: download, verify, window, install, rollback.

The packages come from the real API (uploaded and downloaded over HTTP), the units are
simulated over Modbus TCP; the window is on the shared manual clock.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DeviceError, UpgradeFailed, UpgradeRefused, UpgradeRolledBack
from protocols.clock import ManualClock
from protocols.packages import Package, PackageRef, UpgradeJob
from protocols.signing import Ed25519PrivateKey, generate_private_key
from server.upgrades import releases
from server.upgrades.models import ReleasePackage
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for
from tests.upgrades.world import (
    Api,
    SiteRig,
    firmware,
    fixes,
    make_site,
    signed,
    signed_delta,
    upload,
)

V100, V110 = firmware("1.0.0"), firmware("1.1.0", change=40)


@dataclass
class Rig:
    """The API with releases 1.0.0 and 1.1.0 (full and delta) and one site of 2 units."""

    api: Api
    site: SiteRig
    ids: dict[str, int]
    progress: list[dict[str, Any]]

    async def report(self, detail: dict[str, Any]) -> None:
        """The executor's progress callback."""
        self.progress.append(detail)

    async def ref(self, key: str, url: str | None = None) -> PackageRef:
        """A job's reference to an uploaded package."""
        async with self.api.db.session() as s:
            row = await s.get(ReleasePackage, self.ids[key])
            assert row is not None
            ref = releases.package_ref(self.api.settings, self.api.url, row,
                                       self.api.clock.now())
        return ref if url is None else ref.model_copy(update={"url": url})

    async def job(self, device: str = "bs-1", *, start: datetime | None = None,
                  minutes: float = 60, **kw: Any) -> dict[str, Any]:
        """An upgrade job to 1.1.0 for a window starting at `start` (default now)."""
        start = start or self.api.clock.now()
        args: dict[str, Any] = {
            "plan_id": 1, "target_id": 1, "device": device, "settle_s": 0.3,
            "window_start": start, "window_end": start + timedelta(minutes=minutes),
            "package": await self.ref("1.1.0"), "previous": await self.ref("1.0.0"),
        }
        args.update(kw)
        return UpgradeJob.model_validate(args).model_dump(mode="json")


@pytest.fixture
async def rig(api: Api, tmp_path: Path, release_key: Ed25519PrivateKey,
              clock: ManualClock) -> AsyncIterator[Rig]:
    ids = {}
    for name, pkg in (("1.0.0", signed(V100, release_key)),
                      ("1.1.0", signed(V110, release_key, fixes=fixes("derating"))),
                      ("delta", signed_delta(V100, V110, release_key))):
        resp = await upload(api, pkg)
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
    site = await make_site(api.db, api.org_id, 2, tmp_path / "gw", release_key, clock)
    try:
        yield Rig(api, site, ids, [])
    finally:
        await site.close()


async def test_installs_and_keeps_the_previous_image(rig: Rig) -> None:
    detail = await rig.site.executor.run(await rig.job(), rig.report)
    assert detail == {"outcome": "installed", "device": "bs-1", "version": "1.1.0",
                      "previous": "1.0.0"}
    assert rig.site.unit("bs-1").firmware.version == "1.1.0"
    assert rig.site.unit("bs-2").firmware.version == "1.0.0"
    stages = [p["stage"] for p in rig.progress]
    assert stages[0] == "downloading"
    assert stages[-3:] == ["installing", "postchecks", "installed"]
    kept = sorted(p.name for p in (rig.site.executor.dir / "images").iterdir())
    assert kept == ["EMU-BS-1.0.0.img", "EMU-BS-1.1.0.img"]
    assert any(e[2] == "upgrade.installed" for e in rig.site.sink.events)
    # the same job again: the unit runs 1.1.0 already, nothing is installed twice
    again = await rig.site.executor.run(await rig.job(), rig.report)
    assert again["outcome"] == "already_installed"
    assert rig.site.executor.stats.installs == 1


async def test_delta_is_used_once_the_base_image_is_kept(rig: Rig) -> None:
    ex = rig.site.executor
    await ex.run(await rig.job("bs-1", delta=None), rig.report)  # keeps 1.0.0 and 1.1.0
    before = ex.stats.bytes_downloaded
    await ex.run(await rig.job("bs-2", delta=await rig.ref("delta")), rig.report)
    assert rig.site.unit("bs-2").firmware.version == "1.1.0"
    assert ex.stats.bytes_downloaded == before  # 1.1.0 was kept: nothing new downloaded


async def test_delta_rebuilds_the_image(rig: Rig, tmp_path: Path,
                                        release_key: Ed25519PrivateKey,
                                        clock: ManualClock) -> None:
    ex = rig.site.executor
    await ex._keep(Package.parse(signed(V100, release_key).to_bytes()).manifest, V100)
    await ex.run(await rig.job("bs-1", delta=await rig.ref("delta")), rig.report)
    assert rig.site.unit("bs-1").firmware.version == "1.1.0"
    assert ex.stats.bytes_downloaded < len(V110) * 0.2  # the delta only (1.0.0 was kept)


@pytest.mark.parametrize("mode", ["fail", "broken", "refuse"])
async def test_a_failed_install_is_rolled_back(rig: Rig, mode: str) -> None:
    unit = rig.site.unit("bs-1")
    unit.set_update_behaviour(mode)
    with pytest.raises(UpgradeRolledBack, match=r"rolled back to 1\.0\.0"):
        await rig.site.executor.run(await rig.job(), rig.report)
    assert unit.firmware.version == "1.0.0"
    assert not unit.firmware.broken
    assert [p["stage"] for p in rig.progress][-2:] == ["rolling_back", "rolled_back"]


def _in_postchecks(rig: Rig) -> bool:
    return bool(rig.progress) and rig.progress[-1]["stage"] == "postchecks"


async def test_reads_missed_after_the_install_are_waited_for(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy link or a slow restart costs a few reads, not the upgrade (`answer_grace_s`)."""
    ex = rig.site.executor
    real_read = ex._read
    missed: list[str] = []

    async def flaky(unit: Any, names: tuple[str, ...]) -> Any:
        if _in_postchecks(rig) and len(missed) < 3:  # the post-checks' first reads
            missed.append(unit.name)
            raise DeviceError("timed out")
        return await real_read(unit, names)

    monkeypatch.setattr(ex, "_read", flaky)
    detail = await ex.run(await rig.job(), rig.report)
    assert detail["outcome"] == "installed"
    assert missed == ["bs-1"] * 3


async def test_a_unit_silent_past_the_grace_is_rolled_back(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ex = rig.site.executor
    monkeypatch.setattr(ex, "options", replace(ex.options, answer_grace_s=0.2))
    real_read = ex._read
    silent = True

    async def mute(unit: Any, names: tuple[str, ...]) -> Any:
        nonlocal silent
        if _in_postchecks(rig) and silent:
            silent = False  # once the job gave up on it, the unit answers the rollback
            await asyncio.sleep(0.3)  # past the grace
            raise DeviceError("timed out")
        return await real_read(unit, names)

    monkeypatch.setattr(ex, "_read", mute)
    with pytest.raises(UpgradeRolledBack, match="does not answer after the install"):
        await ex.run(await rig.job(), rig.report)
    assert rig.site.unit("bs-1").firmware.version == "1.0.0"


async def test_tampered_package_is_refused_before_install(
    rig: Rig, release_key: Ed25519PrivateKey,
) -> None:
    # a package whose stored payload is altered after upload: the signed hash no longer matches
    resp = await upload(rig.api, signed(firmware("1.1.7", change=7), release_key))
    assert resp.status_code == 201, resp.text
    rig.ids["1.1.7"] = resp.json()["id"]
    async with rig.api.db.session() as s:
        row = await s.get(ReleasePackage, rig.ids["1.1.7"])
        assert row is not None
        path = releases.releases_dir(rig.api.settings) / row.path
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UpgradeRefused, match="SHA-256 does not match"):
        await rig.site.executor.run(await rig.job(package=await rig.ref("1.1.7")), rig.report)
    assert rig.site.unit("bs-1").firmware.version == "1.0.0"


async def test_wrong_signature_is_refused(rig: Rig) -> None:
    ref = await rig.ref("1.1.0")
    forged = base64.b64encode(generate_private_key().sign(b"x")).decode()
    job = await rig.job(package=ref.model_copy(update={"signature": forged}))
    with pytest.raises(UpgradeRefused, match="does not verify"):
        await rig.site.executor.run(job, rig.report)
    unsigned = await rig.job(package=ref.model_copy(update={"signature": None}))
    with pytest.raises(UpgradeRefused, match="not signed"):
        await rig.site.executor.run(unsigned, rig.report)
    assert rig.site.executor.stats.bytes_downloaded == 0  # refused before downloading


async def test_downgrade_is_refused_unless_rollback(rig: Rig) -> None:
    await rig.site.executor.run(await rig.job(), rig.report)
    down = await rig.job(package=await rig.ref("1.0.0"), previous=await rig.ref("1.1.0"))
    with pytest.raises(UpgradeRefused, match="downgrade"):
        await rig.site.executor.run(down, rig.report)
    assert rig.site.unit("bs-1").firmware.version == "1.1.0"
    back = await rig.job(package=await rig.ref("1.0.0"), previous=await rig.ref("1.1.0"),
                         rollback=True)
    assert (await rig.site.executor.run(back, rig.report))["version"] == "1.0.0"


async def test_download_cut_at_half_resumes(rig: Rig, release_key: Ed25519PrivateKey) -> None:
    big = firmware("1.2.0", size=96 * 1024)  # headers are noise next to the payload
    resp = await upload(rig.api, signed(big, release_key))
    assert resp.status_code == 201, resp.text
    rig.ids["1.2.0"] = resp.json()["id"]
    size = len(big)
    host, port = rig.api.url.removeprefix("http://").split(":")
    async with TcpProxy(host, int(port), cut_after_bytes=size // 2) as proxy:
        ref = await rig.ref("1.2.0")
        url = ref.url.replace(rig.api.url, f"http://127.0.0.1:{proxy.port}")
        job = await rig.job(package=ref.model_copy(update={"url": url}), previous=None)
        await rig.site.executor.run(job, rig.report)
        assert proxy.cuts == 1
        assert rig.site.executor.stats.resumed == 1
        assert proxy.bytes_down <= 1.1 * size
    assert rig.site.unit("bs-1").firmware.version == "1.2.0"


async def test_nothing_installs_before_the_window_opens(rig: Rig, clock: ManualClock) -> None:
    start = clock.now() + timedelta(hours=2)
    ex = rig.site.executor
    import asyncio

    task = asyncio.create_task(ex.run(await rig.job(start=start), rig.report))
    await wait_for(lambda: any(p["stage"] == "waiting_for_window" for p in rig.progress), 10,
                   "the executor to wait for the window")
    clock.advance(2 * 3600 - 1)  # one second before the window
    await wait_for(lambda: len(rig.progress) >= 3, 10, "progress")
    assert not task.done()
    assert rig.site.unit("bs-1").firmware.version == "1.0.0"
    assert "installing" not in [p["stage"] for p in rig.progress]
    clock.advance(1)  # the window opens
    assert (await wait_for(task, 20, "the install"))["version"] == "1.1.0"


async def test_nothing_installs_after_the_window_closed(rig: Rig, clock: ManualClock) -> None:
    start = clock.now() - timedelta(minutes=60)
    with pytest.raises(UpgradeRefused, match="window ended"):
        await rig.site.executor.run(await rig.job(start=start, minutes=60), rig.report)
    assert rig.site.unit("bs-1").firmware.version == "1.0.0"


async def test_prechecks_refuse_an_unhealthy_unit(rig: Rig) -> None:
    rig.site.unit("bs-1").inject("over_temperature")
    with pytest.raises(UpgradeFailed, match=r"pre-checks failed.*OVER_TEMPERATURE"):
        await rig.site.executor.run(await rig.job(), rig.report)
    assert rig.site.unit("bs-1").firmware.version == "1.0.0"
