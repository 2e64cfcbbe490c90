"""The whole rollout against real upstreams: promotion, rollback, warning, hang, outage,
restarts and a corrupt state file. The proxy is the real `CanaryServer` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

import aiohttp

from config.loader import load_settings
from proxy.front.server import CanaryServer
from tests.polling import until
from tests.admin_support import upstream_url
from tests.serve_process import write_config
from tests.upstreams import STATS


def rollout_config(tmp_path: Path, upstreams, *, bake: str = "200ms") -> Path:
    base, canary = upstream_url(upstreams["baseline"]), upstream_url(upstreams["canary"])
    return write_config(
        tmp_path / "canary.yaml",
        f"""
listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0", token: "t"}}
upstreams:
  baseline: {{url: "{base}"}}
  canary: {{url: "{canary}", timeout: {{total: 30s}}}}
routing: {{sticky_key: ""}}
rollout: {{stages: [5, 25, 50, 100], bake: {bake}, min_requests: 20}}
analysis:
  window: 10s
  interval: 50ms
  min_requests: 20
  latency: {{p95_warning: 300ms, p99_critical: 600ms}}
""",
    )


@contextlib.asynccontextmanager
async def running(config: Path) -> AsyncIterator[CanaryServer]:
    server = CanaryServer(load_settings(config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def traffic(server: CanaryServer, *, concurrency: int = 8) -> AsyncIterator[list[int]]:
    """Requests in a loop until the block ends; yields the list of statuses seen."""
    statuses: list[int] = []
    url = f"http://127.0.0.1:{server.proxy_port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        async def worker() -> None:
            while True:
                async with client.post(url, json={"model": "m"}) as resp:
                    await resp.read()
                    statuses.append(resp.status)
        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        try:
            yield statuses
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


def canary_requests(server: CanaryServer) -> int:
    """Every canary request the proxy answered since it started (all code classes)."""
    return sum(server.recorder.arms["canary"].code_totals)


async def test_healthy_canary_walks_every_stage_to_promoted(tmp_path, upstreams):
    async with running(rollout_config(tmp_path, upstreams)) as server, traffic(server):
        await until(lambda: server.controller.state.state == "promoted", timeout=60, what="promotion")
    weights = [t["weight"] for t in server.controller.history() if t["action"] == "promote"]
    assert weights == [25, 50, 100, 100]  # the last one: 100% baked, state promoted
    assert server.router.snapshot.weight == 100


async def test_canary_at_30_percent_errors_is_rolled_back_and_stays_so_after_restart(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.3
    config = rollout_config(tmp_path, upstreams, bake="1h")
    async with running(config) as server, traffic(server, concurrency=16):
        await until(lambda: server.controller.state.state == "rolled_back", timeout=60, what="rollback")
        seen = canary_requests(server)
    assert seen <= 400, f"took {seen} canary requests"
    rollback = [t for t in server.controller.history() if t["action"] == "rollback"][-1]
    assert rollback["trigger"] == "auto" and rollback["weight"] == 0
    assert rollback["evidence"], "the decision carries its figures"
    async with running(config) as again:
        assert again.controller.state.state == "rolled_back"
        assert again.router.snapshot.weight == 0


async def test_canary_at_8_percent_errors_triggers_the_warning_action(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.085
    config = rollout_config(tmp_path, upstreams, bake="1h")
    write_config(config, config.read_text().replace("bake: 1h", "bake: 1h, weight: 50"))
    async with running(config) as server, traffic(server, concurrency=16):
        await until(
            lambda: any(t["action"] in ("step_back", "pause") and t["trigger"] == "auto"
                        for t in server.controller.history()),
            timeout=90, what="the warning action",
        )
        state = server.controller.state
    assert state.state == "paused" and state.weight == 25  # step_back from 50 and hold
    assert server.router.snapshot.weight == 25


async def test_hanging_canary_is_rolled_back_while_it_hangs(tmp_path, upstreams):
    canary = upstreams["canary"].app[STATS]
    canary.hang = True
    config = rollout_config(tmp_path, upstreams, bake="1h")
    write_config(config, config.read_text().replace("bake: 1h", "bake: 1h, weight: 50"))
    async with running(config) as server, traffic(server, concurrency=64):
        await until(lambda: canary.inflight >= 20, timeout=10, what="20 hung canary requests")
        await until(lambda: server.controller.state.state == "rolled_back", timeout=30, what="rollback")
        still_hanging = canary.inflight
        canary.release.set()
    assert still_hanging >= 20, "rolled back only after the hung requests ended, not while they hung"
    rollback = [t for t in server.controller.history() if t["action"] == "rollback"][-1]
    assert "latency.p99_critical" in rollback["reason"], rollback["reason"]


async def test_shared_outage_is_reported_but_not_rolled_back(tmp_path, upstreams):
    for arm in ("baseline", "canary"):
        upstreams[arm].app[STATS].fail_ratio = 0.3
    config = rollout_config(tmp_path, upstreams, bake="1h")
    write_config(config, config.read_text().replace("bake: 1h", "bake: 1h, weight: 50"))
    async with running(config) as server, traffic(server, concurrency=16):
        await until(lambda: canary_requests(server) >= 600, timeout=60, what="600 canary requests")
        verdict = server.controller.verdict().to_json()
        state = server.controller.state
    assert state.state == "manual" and state.weight == 50
    assert verdict["level"] in ("warning", "critical")
    assert any("baseline" in reason for reason in verdict["reasons"])


async def test_corrupt_state_file_is_kept_and_weight_0_served(tmp_path, upstreams):
    config = rollout_config(tmp_path, upstreams)
    state_file = tmp_path / "var" / "canary-state.json"
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(b'{"state": "progre')
    async with running(config) as server, traffic(server):
        await until(lambda: sum(server.recorder.arms["baseline"].code_totals) >= 50, timeout=20, what="traffic")
        status = server.controller.status()
    assert state_file.read_bytes() == b'{"state": "progre'
    assert server.router.snapshot.weight == 0 and canary_requests(server) == 0
    assert status["weight"] == 0 and status["store"]["error"]
