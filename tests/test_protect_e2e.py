"""Protecting users from the canary (CONTRACT §8) with the real `CanaryServer` in front of
real upstreams: a broken canary is rolled back while its users never see its errors."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import aiohttp

from proxy.cli.status import format_status
from tests.admin_support import upstream_url
from tests.polling import until
from tests.serve_process import write_config
from tests.test_rollout_e2e import canary_requests, running, traffic
from tests.test_workers import two_workers
from tests.upstreams import STATS


def protect_config(
    tmp_path: Path, upstreams, *, routing: str = "", rollout: str = "",
    latency: str = "p95_warning: 300ms, p99_critical: 600ms", canary_pool: str = "max_connections: 20",
) -> Path:
    base, canary = upstream_url(upstreams["baseline"]), upstream_url(upstreams["canary"])
    return write_config(
        tmp_path / "canary.yaml",
        f"""
listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0", token: "t"}}
upstreams:
  baseline: {{url: "{base}"}}
  canary: {{url: "{canary}", timeout: {{total: 30s}}, pool: {{{canary_pool}}}}}
routing: {{sticky_key: "", {routing}}}
rollout: {{stages: [50, 100], bake: 1h, min_requests: 20, {rollout}}}
analysis:
  window: 10s
  interval: 50ms
  min_requests: 20
  latency: {{{latency}}}
""",
    )


@dataclass(frozen=True)
class Answer:
    status: int
    arm: str
    fallback: str | None
    state: str = ""  # the rollout's state when the answer arrived


@contextlib.asynccontextmanager
async def clients(server, *, method: str = "GET", concurrency: int = 8) -> AsyncIterator[list[Answer]]:
    """Client requests in a loop until the block ends; yields every answer seen."""
    answers: list[Answer] = []
    url = f"http://127.0.0.1:{server.proxy_port}/v1/models"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                async with client.request(method, url) as resp:
                    await resp.read()
                    answers.append(Answer(
                        resp.status, resp.headers["X-Canary-Arm"], resp.headers.get("X-Canary-Fallback"),
                        server.controller.state.state,
                    ))

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        try:
            yield answers
        finally:
            stop.set()  # each finishes its request: every request sent is answered and counted
            await asyncio.gather(*workers)


def hits(upstreams, arm: str) -> int:
    return upstreams[arm].app[STATS].hits


async def scrape(server) -> str:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
            return await resp.text()


def metric(text: str, series: str) -> float:
    """The value of one series in a Prometheus text scrape."""
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


async def test_with_fallback_a_failing_canary_is_rolled_back_and_clients_see_no_error(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.3
    config = protect_config(tmp_path, upstreams, routing="fallback: {enabled: true}")
    async with running(config) as server, traffic(server, concurrency=16) as statuses:
        await until(lambda: server.controller.state.state == "rolled_back", timeout=60, what="rollback")
        seen = canary_requests(server)
        metrics = await scrape(server)
    assert statuses and set(statuses) == {200}, "no client saw the canary's errors"
    assert seen <= 400, f"rolled back after {seen} canary requests, as fast as without fallback"
    rollback = [t for t in server.controller.history() if t["action"] == "rollback"][-1]
    assert rollback["trigger"] == "auto" and "critical" in rollback["reason"]
    assert 0 < metric(metrics, 'canary_fallbacks_total{kind="5xx"}') <= server.fallback.counts["5xx"]


async def test_a_fallback_contacts_the_baseline_exactly_once_per_client_request(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.5
    config = protect_config(tmp_path, upstreams, routing="fallback: {enabled: true}", rollout="weight: 50")
    async with running(config) as server, clients(server) as answers:
        await until(lambda: len(answers) >= 200, timeout=30, what="200 answers")
    assert {a.status for a in answers} == {200}
    by_baseline = sum(a.arm == "baseline" for a in answers)
    replayed = sum(a.fallback == "5xx" for a in answers)
    assert replayed > 0
    assert hits(upstreams, "baseline") == by_baseline  # the split's share plus one per replay
    assert hits(upstreams, "canary") == sum(a.arm == "canary" for a in answers) + replayed


async def test_a_healthy_shadow_goes_to_the_first_stage_and_reset_returns_to_it(tmp_path, upstreams):
    config = protect_config(tmp_path, upstreams, rollout="shadow: 300ms")
    async with running(config) as server:
        assert (server.controller.state.state, server.weight()) == ("shadow", 0)
        assert server.router.snapshot.shadow
        async with clients(server) as answers:
            await until(lambda: server.controller.state.state == "progressing", timeout=30, what="first stage")
        assert server.weight() == 50 and not server.router.snapshot.shadow
        # an answer that arrived while still in shadow was routed in shadow: the baseline's
        in_shadow = [a.arm for a in answers if a.state == "shadow"]
        assert in_shadow and set(in_shadow) == {"baseline"}, "no client saw the canary during shadow"
        assert server.mirror.sent >= 20  # rollout.min_requests mirrored
        start, promote = server.controller.history()[:2]
        assert (start["state"], start["weight"]) == ("shadow", 0)
        assert (promote["action"], promote["from_state"], promote["weight"]) == ("promote", "shadow", 50)
        assert "mirrored canary requests" in promote["reason"]
        status = server.controller.reset("again")
        assert (status["state"], status["weight"]) == ("shadow", 0) and server.router.snapshot.shadow


async def test_a_broken_canary_is_rolled_back_in_shadow_with_no_canary_answer_delivered(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 1.0
    config = protect_config(tmp_path, upstreams, rollout="shadow: 1h")
    async with running(config) as server, clients(server) as answers:
        await until(lambda: server.controller.state.state == "rolled_back", timeout=30, what="rollback in shadow")
        metrics = await scrape(server)
    assert answers and {(a.status, a.arm) for a in answers} == {(200, "baseline")}
    assert hits(upstreams, "baseline") == len(answers)  # exactly once per client request
    assert hits(upstreams, "canary") >= 20 and not server.router.snapshot.shadow
    rollback = server.controller.history()[-1]
    assert (rollback["action"], rollback["trigger"], rollback["from_state"]) == ("rollback", "auto", "shadow")
    assert metric(metrics, 'canary_rollout_state{state="rolled_back"}') == 1
    assert metric(metrics, "canary_shadow_requests_total") >= 20


async def test_a_hung_canary_in_shadow_never_holds_up_a_client(tmp_path, upstreams):
    canary = upstreams["canary"].app[STATS]
    canary.hang = True
    config = protect_config(
        tmp_path, upstreams, rollout="shadow: 1h", latency="p95_warning: 1m, p99_critical: 2m",
        canary_pool="max_connections: 4, max_keepalive: 4",
    )
    try:
        async with running(config) as server:
            async with aiohttp.ClientSession() as client:
                for _ in range(40):  # one after the other: each answered while copies hang
                    async with client.get(f"http://127.0.0.1:{server.proxy_port}/v1/models") as resp:
                        assert (resp.status, resp.headers["X-Canary-Arm"]) == (200, "baseline")
                        await resp.read()
            metrics = await scrape(server)
            status = await admin_status(server)
            assert canary.inflight == 4  # the copies' own limit: the canary's pool
    finally:
        canary.release.set()
    assert hits(upstreams, "baseline") == 40
    assert metric(metrics, 'canary_shadow_dropped_total{reason="queue_full"}') == 40 - 4 - 4  # 4 waiting
    shadow = status["shadow"]
    assert (shadow["active"], shadow["inflight"], shadow["queued"]) == (True, 4, 4)
    assert status["state"] == "shadow"
    assert "state    SHADOW" in format_status(status)  # `canary status`
    assert "32 dropped (mirroring now)" in format_status(status)


async def admin_status(server) -> dict:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{server.admin_port}/status") as resp:
            return await resp.json()


async def test_with_two_workers_a_broken_canary_is_rolled_back_in_shadow(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 1.0
    config = two_workers(protect_config(tmp_path, upstreams, rollout="shadow: 1h"))
    async with running(config) as server, clients(server) as answers:
        await until(lambda: server.controller.state.state == "rolled_back", timeout=30, what="rollback in shadow")
        await until(lambda: server.mirror.sent >= 20, timeout=10, what="the workers' mirrored counts")
    assert answers and {(a.status, a.arm) for a in answers} == {(200, "baseline")}
    assert hits(upstreams, "baseline") == len(answers)
    assert server.controller.history()[-1]["from_state"] == "shadow"


async def test_the_dashboard_shows_the_shadow_stage(tmp_path, upstreams):
    from playwright.async_api import async_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, wait_loaded

    config = protect_config(tmp_path, upstreams, rollout="shadow: 1h")
    async with running(config) as server:
        async with clients(server, concurrency=2):
            await until(lambda: server.mirror.sent >= 5, timeout=10, what="mirrored copies")
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{server.admin_port}/")
                await wait_loaded(page)
                assert await page.inner_text("#state") == "SHADOW"
                assert "every client gets the baseline" in await page.inner_text("#stage")
                assert await page.inner_text("#stages span.current") == "shadow"
                assert f"{server.mirror.sent} mirrored, 0 dropped" in await page.inner_text("#shadow")
            finally:
                await browser.close()


async def test_fallback_turned_on_by_a_config_reload_applies_to_the_next_request(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 1.0
    config = protect_config(tmp_path, upstreams)
    url = "/v1/models"
    async with running(config) as server, aiohttp.ClientSession() as client:
        proxy = f"http://127.0.0.1:{server.proxy_port}{url}"
        async with client.get(proxy, headers={"X-Canary": "canary"}) as resp:
            assert (resp.status, resp.headers["X-Canary-Arm"]) == (500, "canary")
        write_config(config, config.read_text().replace('sticky_key: "", ', 'sticky_key: "", fallback: {enabled: true}'))
        assert await server.reload()
        async with client.get(proxy, headers={"X-Canary": "canary"}) as resp:
            assert (resp.status, resp.headers["X-Canary-Arm"], resp.headers["X-Canary-Fallback"]) == (200, "baseline", "5xx")
