"""Protecting users from the canary (CONTRACT §8) with the real `CanaryServer` in front of
real upstreams: a broken canary is rolled back while its users never see its errors."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.admin_support import upstream_url
from tests.polling import until
from tests.serve_process import write_config
from tests.test_rollout_e2e import canary_requests, running, traffic
from tests.upstreams import STATS


def protect_config(tmp_path: Path, upstreams, *, routing: str = "", rollout: str = "", analysis: str = "") -> Path:
    base, canary = upstream_url(upstreams["baseline"]), upstream_url(upstreams["canary"])
    return write_config(
        tmp_path / "canary.yaml",
        f"""
listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0", token: "t"}}
upstreams:
  baseline: {{url: "{base}"}}
  canary: {{url: "{canary}", timeout: {{total: 30s}}}}
routing: {{sticky_key: "", {routing}}}
rollout: {{stages: [50, 100], bake: 1h, min_requests: 20, {rollout}}}
analysis:
  window: 10s
  interval: 50ms
  min_requests: 20
  latency: {{p95_warning: 300ms, p99_critical: 600ms}}
  {analysis}
""",
    )


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
