"""Debian's Chromium driven by Playwright (Python), for the dashboard's browser tests.

No `playwright install`: the tests use the distribution's `/usr/bin/chromium` (CI installs it
with apt; `.ci/run` does so when it is missing) with the flags these machines need. Without
it the browser tests are skipped with the reason, so a newcomer's `pytest` still passes.
Screenshots go to `tests/artifacts/screens/` (git-ignored), at 1366x768 and at 390 px.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, ViewportSize, async_playwright

CHROMIUM = Path(os.environ.get("EMU_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "screens"
DESKTOP: ViewportSize = {"width": 1366, "height": 768}
PHONE: ViewportSize = {"width": 390, "height": 844}

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium; CI installs it)",
)


@asynccontextmanager
async def browser_context(profile: Path) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium (its own user-data-dir under `profile`) as a Playwright context."""
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True,
            args=list(CHROMIUM_ARGS), viewport=DESKTOP,
        )
        try:
            yield context
        finally:
            await context.close()


async def screenshots(page: Page, name: str) -> list[Path]:
    """The page at 1366x768 and at 390 px wide, full length; their files.

    Also checks that nothing is wider than the phone's viewport except inside a horizontally
    scrolling table wrapper (tables scroll; the page itself must not).
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    files = []
    for label, size in (("1366", DESKTOP), ("390", PHONE)):
        await page.set_viewport_size(size)
        path = ARTIFACTS / f"{slug}-{label}.png"
        await page.screenshot(path=str(path), full_page=True)
        files.append(path)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, f"{name} at {label} px is {overflow} px too wide"
    await page.set_viewport_size(DESKTOP)
    return files
