"""The dashboard at GET / in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path

import aiohttp
from playwright.async_api import Page, async_playwright, expect

from tests.admin_support import TOKEN, admin_get, admin_post, until_status

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# No skip: without Chromium this test fails (scripts/test.sh and .ci/run install it).


async def mixed_traffic(url: str, stop: asyncio.Event) -> None:
    """Both arms, a little slower and a little less healthy on the canary (below the thresholds)."""
    plan = {"baseline": ("/sleep/0.01", 200), "canary": ("/sleep/0.03", 40)}  # path, 1 error in N

    async def worker(session: aiohttp.ClientSession, arm: str) -> None:
        path, every = plan[arm]
        for n in itertools.count(1):
            if stop.is_set():
                return
            target = "/status/500" if n % every == 0 else path
            async with session.get(f"{url}{target}", headers={"X-Canary": arm}) as response:
                await response.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, arm) for arm in ("baseline", "baseline", "canary", "canary")))


async def wait_loaded(page: Page) -> None:
    await page.wait_for_selector("body[data-loaded=true]", timeout=10_000)


async def test_dashboard_shows_the_rollout_and_rolls_back(canary, tmp_path):
    proxy = await canary()
    assert (await admin_post(proxy, "/promote", {"reason": "stage 1 looked fine"}))[0] == 200
    stop = asyncio.Event()
    traffic = asyncio.create_task(mixed_traffic(proxy.proxy_url, stop))
    console_errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            await page.goto(f"{proxy.admin_url}/")
            await wait_loaded(page)
            await until_series(proxy, points=8)
            await page.reload()
            await wait_loaded(page)
            assert console_errors == []
            await check_figures(page)
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            shutil.copy(tmp_path / "dashboard.png", "/tmp/dashboard.png")
            stop.set()
            await traffic
            await roll_back_from_the_page(page, proxy)
            await page.screenshot(path=str(tmp_path / "dashboard-rolled-back.png"), full_page=True)
        finally:
            stop.set()
            await browser.close()
    await traffic


async def until_series(proxy, points: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len((await admin_get(proxy, "/series"))["t"]) < points:
        assert loop.time() < deadline, "the dashboard series did not grow"
        await asyncio.sleep(0.05)


async def check_figures(page: Page) -> None:
    assert await page.inner_text("#state") == "PROGRESSING"
    assert await page.inner_text("#weight") == "25%"
    assert "stage 2 of 4" in await page.inner_text("#stage")
    for arm in ("baseline", "canary"):
        requests = await page.inner_text(f"#arm-{arm} td[data-k=requests]")
        assert int(requests) > 20, (arm, requests)
        assert (await page.inner_text(f"#arm-{arm} td[data-k=error_rate]")).endswith("%")
        assert (await page.inner_text(f"#arm-{arm} td[data-k=p95]")).endswith("ms")
    assert await page.locator("#history tr").count() == 2  # start, promote
    assert await page.locator("#tests tr").count() >= 4


async def roll_back_from_the_page(page: Page, proxy) -> None:
    await page.click("#btn-rollback")
    await page.fill("#token-input", "not-the-token")
    await page.click("#token-ok")
    await expect(page.locator("#action-result")).to_contain_text("rejected")
    assert (await admin_get(proxy, "/status"))["state"] == "progressing"

    await page.click("#btn-rollback")
    await page.fill("#token-input", TOKEN)
    await page.click("#token-ok")
    status = await until_status(proxy, lambda s: s["state"] == "rolled_back", timeout=5)
    assert status["weight"] == 0 and status["history"][-1]["reason"] == "dashboard rollback"
    await expect(page.locator("#state")).to_have_text("rolled back")
    assert await page.inner_text("#weight") == "0%"
    assert "kept for this tab" in await page.inner_text("#token-state")
