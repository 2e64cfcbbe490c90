"""The dashboard of any replica shows every replica of the shared rollout (real Chromium)."""

from __future__ import annotations

from playwright.async_api import async_playwright, expect

from tests.polling import until_async
from tests.replica_support import redis_config
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, wait_loaded
from tests.test_replica_faults import serving, statuses
from tests.test_rollout_e2e import rollout_config


async def test_the_dashboard_lists_the_replicas_and_the_decider(tmp_path, upstreams, redis_server):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), redis_server.url)
    async with serving(config, 2) as processes:
        known = await until_async(lambda: statuses(processes), lambda all_: all(len(s["replicas"]) == 2 for s in all_), 10)
        ids = sorted(s["replica_id"] for s in known)
        errors: list[str] = []
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{processes[1].admin_url}/")
                await wait_loaded(page)
                rows = page.locator("#replicas tr")
                await expect(rows).to_have_count(2)
                assert sorted(await rows.evaluate_all("rows => rows.map(r => r.dataset.replica)")) == ids
                await expect(page.locator("#replicas td", has_text="decider")).to_have_count(1)
                await expect(page.locator("#replica-self")).to_have_text(known[1]["replica_id"])
                await expect(page.locator("#replica-backend")).to_contain_text("lease held by")
            finally:
                await browser.close()
        assert errors == []
