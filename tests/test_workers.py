"""`workers: 2`: two real worker processes behind one supervisor are one proxy and one
rollout. The supervisor is the real `CanaryServer` in the test's loop (so its controller
can be read), or the real `canary serve` as a child process for the signal tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import psutil
from structlog.testing import capture_logs

from config.loader import load_settings
from proxy.front.server import CanaryServer
from tests.admin_support import TOKEN, admin_get, control_config, edit, run_cli, until_status, upstream_url
from tests.polling import until, until_async
from tests.serve_process import ServeProcess, write_config
from tests.upstreams import STATS
from tests.test_rollout_e2e import rollout_config


def two_workers(config: Path) -> Path:
    return write_config(config, "workers: 2\n" + config.read_text())


@contextlib.asynccontextmanager
async def supervisor(config: Path) -> AsyncIterator[CanaryServer]:
    server = CanaryServer(load_settings(config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def fresh_connections(url: str, count: int) -> list[tuple[int, str]]:
    """`count` requests, each on a new connection (so the kernel spreads them over the
    workers): (status, arm header) of each."""
    answers = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as client:
        for _ in range(count):
            async with client.get(url) as response:
                await response.read()
                answers.append((response.status, response.headers.get("X-Canary-Arm", "")))
    return answers


@contextlib.asynccontextmanager
async def traffic(url: str, *, concurrency: int = 8, fresh: bool = False) -> AsyncIterator[list[int | str]]:
    """Requests in a loop until the block ends, on `concurrency` keep-alive connections
    (the kernel spreads them over the workers) or each on a new one: the statuses (or
    the error's name)."""
    outcomes: list[int | str] = []
    connector = aiohttp.TCPConnector(force_close=fresh, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:
        async def loop() -> None:
            while True:
                try:
                    async with client.post(url, json={"model": "m"}) as response:
                        await response.read()
                        outcomes.append(response.status)
                except aiohttp.ClientError as exc:
                    outcomes.append(type(exc).__name__)

        tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
        try:
            yield outcomes
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def served_by_each(server: CanaryServer) -> list[int]:
    return [worker["requests"] for worker in server.workers_status() or []]


def url(server: CanaryServer, path: str = "/v1/chat/completions") -> str:
    return f"http://127.0.0.1:{server.proxy_port}{path}"


async def test_two_workers_judge_the_sum_and_roll_back_a_30_percent_error_canary(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.3
    config = two_workers(rollout_config(tmp_path, upstreams, bake="1h"))
    async with supervisor(config) as server, traffic(url(server), concurrency=16):
        assert server.weight() == 5 and server.recorder is server.pool.evidence
        await until(lambda: server.controller.state.state == "rolled_back", timeout=60, what="rollback")
        await until(lambda: min(served_by_each(server)) > 0, timeout=10, what="both workers reported")
        answers = await fresh_connections(url(server, "/echo"), 40)
        history = server.controller.history()
    rollbacks = [t for t in history if t["action"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["trigger"] == "auto"  # one rollout, one decision
    assert _arms(answers) == {"baseline": 40}  # every worker at weight 0


async def test_two_workers_walk_a_healthy_canary_through_every_stage(tmp_path, upstreams):
    config = two_workers(rollout_config(tmp_path, upstreams))
    write_config(config, config.read_text().replace("stages: [5, 25, 50, 100]", "stages: [20, 50, 100]"))
    async with supervisor(config) as server, traffic(url(server), concurrency=16):
        await until(lambda: server.controller.state.state == "promoted", timeout=90, what="promotion")
        answers = await fresh_connections(url(server, "/echo"), 40)
        each = served_by_each(server)
        history = server.controller.history()
    assert [t["weight"] for t in history if t["action"] == "promote"] == [50, 100, 100]
    assert len(each) == 2 and min(each) > 0, each  # both workers served the rollout
    assert _arms(answers) == {"canary": 40}


async def test_a_weight_change_reaches_every_worker(tmp_path, upstreams):
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=0))
    echo = None
    async with supervisor(config) as server:
        echo = url(server, "/echo")
        assert Counter(arm for _s, arm in await fresh_connections(echo, 20)) == {"baseline": 20}
        server.controller.set_weight(100, reason="all in")
        await until_async(lambda: fresh_connections(echo, 20), lambda got: _arms(got) == {"canary": 20}, timeout=2)
        server.controller.rollback(reason="all out")
        await until_async(lambda: fresh_connections(echo, 20), lambda got: _arms(got) == {"baseline": 20}, timeout=2)
        await until(lambda: len(served_by_each(server)) == 2 and min(served_by_each(server)) >= 5, what="both served")


def _arms(answers: list[tuple[int, str]]) -> Counter[str]:
    return Counter(arm for _status, arm in answers)


async def test_status_and_decisions_count_every_workers_requests(tmp_path, upstreams):
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50))
    async with supervisor(config) as server:
        answers = await fresh_connections(url(server, "/echo"), 200)
        hits = {arm: upstreams[arm].app[STATS].hits for arm in ("baseline", "canary")}

        def stage_requests() -> dict[str, int]:
            return {arm: figures["stage"]["requests"] for arm, figures in server.controller.status()["arms"].items()}

        await until(lambda: stage_requests() == hits, timeout=5, what=f"stage counts {hits}")
        each = served_by_each(server)
    assert sum(hits.values()) == 200 and min(hits.values()) > 50, hits
    assert _arms(answers) == {"baseline": hits["baseline"], "canary": hits["canary"]}
    assert sum(each) == 200 and min(each) > 0, each  # both workers served; the totals add up


async def canary_requests_metric(server: CanaryServer) -> float:
    """Every request in `canary_requests_total` (both arms, all codes) from /metrics."""
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{server.admin_port}/metrics") as response:
            text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("canary_requests_total{"))


async def test_a_killed_worker_is_restarted_the_other_serves_and_nothing_is_lost(tmp_path, upstreams):
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50))
    scrapes: list[float] = []
    with capture_logs() as logs:
        async with supervisor(config) as server, traffic(url(server), concurrency=8, fresh=True) as outcomes:
            await until(lambda: min(served_by_each(server)) >= 20, timeout=10, what="both workers serving")
            before = (server.controller.state, server.controller.history())
            victim = server.workers_status()[0]
            scrapes.append(await canary_requests_metric(server))
            os.kill(victim["pid"], signal.SIGKILL)
            at_kill = len(outcomes)

            def restarted() -> bool:
                slot = server.workers_status()[0]
                return slot["pid"] != victim["pid"] and slot["alive"]

            deadline = asyncio.get_running_loop().time() + 10
            while not restarted():  # scrape all along: a counter never goes backwards
                assert asyncio.get_running_loop().time() < deadline, "worker 0 was not restarted"
                scrapes.append(await canary_requests_metric(server))
                await asyncio.sleep(0.01)
            served_meanwhile = len(outcomes) - at_kill
            after_restart = len(outcomes)
            await until(lambda: len(outcomes) >= after_restart + 100, timeout=10, what="traffic after the restart")
            await until(lambda: served_by_each(server)[0] > 0, timeout=10, what="the new worker serving")
            scrapes.append(await canary_requests_metric(server))
            after = (server.controller.state, server.controller.history())
    events = {event["event"]: event for event in logs if event["event"].startswith("worker_")}
    assert events["worker_exited"]["how"] == "killed by SIGKILL" and events["worker_exited"]["slot"] == 0
    assert events["worker_restarted"]["slot"] == 0 and events["worker_restarted"]["restarts"] == 1
    assert served_meanwhile > 0  # the other worker kept serving
    failed = [outcome for outcome in outcomes if outcome != 200]
    assert len(failed) <= 8, Counter(failed)  # at most the requests in flight on the killed one
    assert after == before  # no transition lost, none applied twice: only the supervisor decides
    assert scrapes == sorted(scrapes) and scrapes[-1] > scrapes[0], scrapes


def worker_pids(proxy: ServeProcess) -> set[int]:
    return {event["pid"] for event in proxy.events if event.get("event") in ("worker_started", "worker_restarted")}


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path, upstreams):
    config = control_config(tmp_path / "canary.yaml", upstreams, weight=50)
    proxy = await ServeProcess(config, args=("--workers", "2")).start()
    assert len(worker_pids(proxy)) == 2
    slow = f"{proxy.proxy_url}/sleep/1"
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        async def fetch() -> int:
            async with client.get(slow) as response:
                await response.read()
                return response.status

        inflight = [asyncio.ensure_future(fetch()) for _ in range(12)]
        hits = lambda: sum(upstreams[arm].app[STATS].inflight for arm in ("baseline", "canary"))  # noqa: E731
        await until(lambda: hits() == 12, timeout=10, what="12 slow requests in flight")
        code = await proxy.stop(signal.SIGTERM)
        statuses = await asyncio.gather(*inflight)
    assert code == 0
    assert statuses == [200] * 12  # every worker finished its in-flight requests
    assert not any(psutil.pid_exists(pid) for pid in worker_pids(proxy))
    stopped = [event for event in proxy.events if event.get("event") == "worker_stopped"]
    assert sorted(event["slot"] for event in stopped) == [0, 1] and {e["code"] for e in stopped} == {0}


async def test_reload_and_rollback_act_on_every_worker(tmp_path, upstreams, canary):
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50))
    proxy = await canary(config)
    echo = f"{proxy.proxy_url}/echo"
    # A file edit: every worker answers with the new arm header.
    edit(config, "logging: {", "routing: {arm_header: X-Served-By}\nlogging: {")

    async def headers() -> Counter[str]:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            seen: Counter[str] = Counter()
            for _ in range(30):
                async with client.get(echo) as response:
                    seen[response.headers.get("X-Served-By", "none")] += 1
            return seen

    await until_async(headers, lambda seen: seen["none"] == 0, timeout=5)
    # SIGHUP (even sent to the workers too, as a terminal's hangup would): reloaded once,
    # no worker dies.
    pids = worker_pids(proxy)
    for pid in pids:
        os.kill(pid, signal.SIGHUP)
    proxy.proc.send_signal(signal.SIGHUP)
    await until_status(proxy, lambda status: status["config"]["reloads"]["ok"] == 2)
    status = await admin_get(proxy, "/status")
    assert {worker["pid"] for worker in status["workers"]} == pids and all(w["alive"] for w in status["workers"])
    shown = await run_cli("status", "--admin", proxy.admin_url)
    assert shown.code == 0 and "workers  2 processes" in shown.out, shown.out
    assert all(f"pid {pid}, serving" in shown.out for pid in pids), shown.out
    # `canary rollback` (admin port 0 in the file: written to the state file, picked up
    # at the next tick): every worker sends everything to the baseline.
    result = await run_cli("rollback", "-c", str(config), "--reason", "bad canary")
    assert result.code == 0, result.err
    await until_async(headers, lambda seen: seen == {"baseline": 30}, timeout=3)
    assert (await admin_get(proxy, "/status"))["state"] == "rolled_back"


async def test_fallbacks_in_every_worker_add_up_in_metrics(tmp_path, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 0.5
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50))
    edit(config, "logging: {", "routing: {fallback: {enabled: true, on: [5xx]}}\nlogging: {")
    async with supervisor(config) as server:
        fell_back = 0
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            for _ in range(100):
                async with client.get(url(server, "/echo")) as response:
                    assert response.status == 200  # the baseline answered instead
                    fell_back += "X-Canary-Fallback" in response.headers

        async def fallbacks_metric() -> float:
            async with aiohttp.ClientSession() as admin:
                async with admin.get(f"http://127.0.0.1:{server.admin_port}/metrics") as response:
                    text = await response.text()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("canary_fallbacks_total{"))

        await until_async(fallbacks_metric, lambda total: total == fell_back, timeout=5)
        each = served_by_each(server)
    assert fell_back > 5 and min(each) > 0, (fell_back, each)


async def test_workers_whose_supervisor_is_killed_drain_and_exit(tmp_path, upstreams, canary):
    """No orphan keeps serving a stale weight once nobody decides any more."""
    proxy = await canary(two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50)))
    pids = worker_pids(proxy)
    assert len(pids) == 2
    await proxy.kill()  # SIGKILL: the supervisor cannot tell anyone
    await until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids),
                timeout=10, what="both workers gone")


async def test_a_sticky_key_gets_the_same_arm_on_every_worker(tmp_path, upstreams):
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50))
    async with supervisor(config) as server:
        connector = aiohttp.TCPConnector(force_close=True)  # each request: a new connection
        async with aiohttp.ClientSession(connector=connector) as client:
            arms: dict[str, set[str]] = {}
            for user in range(20):
                for _ in range(6):
                    async with client.get(url(server, "/echo"), headers={"X-User-Id": f"user-{user}"}) as response:
                        arms.setdefault(f"user-{user}", set()).add(response.headers["X-Canary-Arm"])
        await until(lambda: min(served_by_each(server)) > 10, timeout=5, what="both workers served")
    assert all(len(seen) == 1 for seen in arms.values()), arms
    assert {arm for seen in arms.values() for arm in seen} == {"baseline", "canary"}


async def test_a_stopped_worker_is_killed_and_restarted_so_it_no_longer_swallows_connections(tmp_path, upstreams):
    config = two_workers(control_config(tmp_path / "canary.yaml", upstreams, weight=50))
    with capture_logs() as logs:
        async with supervisor(config) as server:
            victim = server.workers_status()[1]
            os.kill(victim["pid"], signal.SIGSTOP)  # a wedged worker: alive, silent, still on the socket
            try:
                await until(
                    lambda: server.workers_status()[1]["pid"] != victim["pid"] and server.workers_status()[1]["alive"],
                    timeout=30, what="the stopped worker replaced",
                )
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim["pid"], signal.SIGCONT)
            answers = await fresh_connections(url(server, "/echo"), 40)
    unresponsive = [event for event in logs if event["event"] == "worker_unresponsive"]
    assert unresponsive and unresponsive[0]["slot"] == 1 and unresponsive[0]["pid"] == victim["pid"]
    assert [status for status, _arm in answers] == [200] * 40  # every fresh connection answered again
