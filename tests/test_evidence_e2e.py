"""Promotion on evidence of health, verdicts that agree with it, and latency judged
against the baseline — the real proxy on 127.0.0.1 in front of real upstreams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.polling import until
from tests.serve_process import write_config
from tests.test_rollout_e2e import canary_requests, rollout_config, running, traffic
from tests.upstreams import STATS


def _with(config: Path, old: str, new: str) -> Path:
    return write_config(config, config.read_text().replace(old, new))


def _automatic(server) -> list[dict]:
    return [t for t in server.controller.history() if t["trigger"] == "auto"]


async def test_a_canary_at_8_percent_errors_is_never_promoted_past_its_stage(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.08
    config = _with(rollout_config(tmp_path, upstreams), "stages: [5, 25, 50, 100]", "stages: [25, 50, 100]")
    async with running(config) as server, traffic(server, concurrency=16):
        await until(
            lambda: canary_requests(server) >= 1500 or any(t["action"] != "promote" for t in _automatic(server)),
            timeout=90, what="1,500 canary requests or the warning action",
        )
        verdict = server.controller.verdict().to_json()
    assert not [t for t in _automatic(server) if t["action"] == "promote"], server.controller.history()
    assert server.controller.state.weight in (0, 25)
    assert verdict["level"] != "ok", verdict["reasons"]


async def test_status_never_reads_ok_for_a_steady_8_percent_canary(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.08
    config = rollout_config(tmp_path, upstreams, bake="1h")
    config = _with(config, "bake: 1h", "bake: 1h, weight: 50")
    config = _with(config, "  min_requests: 20\n  latency:", "  min_requests: 20\n  on_warning: pause\n  latency:")
    levels: list[str] = []
    status: dict = {}
    async with running(config) as server, traffic(server, concurrency=16):
        url = f"http://127.0.0.1:{server.admin_port}/status"
        async with aiohttp.ClientSession() as client:
            async def watch() -> None:
                nonlocal status
                while True:  # back to back, as a dashboard left open would
                    async with client.get(url) as response:
                        status = await response.json()
                    levels.append(status["verdict"]["level"])
            watcher = asyncio.ensure_future(watch())
            try:
                await until(lambda: canary_requests(server) >= 2500, timeout=90, what="2,500 canary requests")
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        tests = status["verdict"]["tests"]
    assert "ok" not in levels and "warning" in levels, levels
    assert tests["errors.warning"]["ci"][0] > 0.05 and tests["errors.warning"]["above"]
    assert server.controller.state.weight == 50  # paused at the same stage, never promoted


async def test_a_canary_three_times_slower_than_the_baseline_is_stepped_back(tmp_path, upstreams):
    upstreams["baseline"].app[STATS].delay = 0.03
    upstreams["canary"].app[STATS].delay = 0.09  # far under the 300 ms / 600 ms limits
    config = _with(rollout_config(tmp_path, upstreams, bake="1h"), "bake: 1h", "bake: 1h, weight: 50")
    async with running(config) as server, traffic(server, concurrency=32):
        await until(lambda: _automatic(server), timeout=60, what="an automatic action")
        state = server.controller.state
    step_back = _automatic(server)[0]
    assert (step_back["action"], state.state, state.weight) == ("step_back", "paused", 25)
    assert step_back["reason"].startswith("warning: canary latency regression:"), step_back["reason"]
    test = step_back["evidence"]["tests"]["latency.regression"]
    assert test["open"] and test["estimate"] > 0.10  # 5% allowed; H1 of the rate test is 10%
    assert test["limit_seconds"] >= 1.5 * test["baseline_p95"]


async def test_a_healthy_canary_is_promoted_on_evidence_with_its_figures(tmp_path, upstreams):
    async with running(rollout_config(tmp_path, upstreams)) as server, traffic(server):
        await until(lambda: server.controller.state.state == "promoted", timeout=60, what="promotion")
    promotions = [t for t in server.controller.history() if t["action"] == "promote"]
    assert [t["weight"] for t in promotions] == [25, 50, 100, 100]
    for promotion in promotions:
        tests = promotion["evidence"]["tests"]
        assert all(tests[name]["below"] for name in ("errors.warning", "latency.p99_critical")), tests
        assert tests["errors.warning"]["ci"][1] < 0.05 and "healthy: every rate shown below" in promotion["reason"]
