"""Faults of a shared rollout, each with a real redis-server and real `canary serve`
processes: a SIGKILLed decider, Redis stopped (SIGSTOP) and restarted, Redis losing its
data, a replica started while Redis does not answer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from tests.admin_support import admin_get, admin_post, run_cli, stays
from tests.polling import until, until_async
from tests.redis_server import RedisServer
from tests.replica_support import redis_config, spread_traffic
from tests.serve_process import ServeProcess
from tests.test_rollout_e2e import rollout_config
from tests.upstreams import STATS


@contextlib.asynccontextmanager
async def serving(config: Path, count: int) -> AsyncIterator[list[ServeProcess]]:
    processes: list[ServeProcess] = []
    try:
        for _ in range(count):
            processes.append(await ServeProcess(config).start())
        yield processes
    finally:
        for process in processes:
            await process.kill()


def urls(processes: list[ServeProcess]) -> list[str]:
    return [f"{p.proxy_url}/v1/chat/completions" for p in processes]


async def status(process: ServeProcess) -> dict:
    return await admin_get(process, "/status")


async def statuses(processes: list[ServeProcess]) -> list[dict]:
    return [await status(p) for p in processes]


def stored(redis: RedisServer) -> dict | None:
    raw = redis.client().get("t:shop:state")
    return json.loads(raw) if raw else None


def history(redis: RedisServer) -> list[dict]:
    return [json.loads(item) for item in redis.client().lrange("t:shop:history", 0, -1)]


async def test_a_sigkilled_decider_is_replaced_and_the_rollout_goes_on_without_a_lost_or_doubled_step(
    tmp_path, upstreams, redis_server
):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="300ms"), redis_server.url)
    async with serving(config, 3) as processes, spread_traffic(urls(processes)):
        first = await until_async(lambda: status(processes[0]), lambda s: s["weight"] >= 25 and s["lease"]["holder"], 30)
        decider = next(p for p, s in zip(processes, await statuses(processes)) if s["lease"]["mine"])
        await decider.kill()  # SIGKILL: its lease is never released
        survivors = [p for p in processes if p is not decider]
        taken = await until_async(
            lambda: status(survivors[0]),
            lambda s: s["lease"]["holder"] not in (None, first["lease"]["holder"]), timeout=5,
        )
        assert taken["lease"]["holder"] in {s["replica_id"] for s in await statuses(survivors)}
        killed_at = max(s["weight"] for s in await statuses(survivors))
        final = await until_async(  # the rollout goes on: the next stage, on both survivors
            lambda: statuses(survivors), lambda all_: all(s["weight"] > killed_at for s in all_), timeout=60
        )
    promotions = [t["weight"] for t in history(redis_server) if t["action"] == "promote"]
    assert promotions == [25, 50, 100, 100][: len(promotions)]  # every step once: none lost, none doubled
    assert len(promotions) >= 2 and final[0]["weight"] == final[1]["weight"] == promotions[-1]


async def test_redis_stopped_replicas_keep_their_weight_never_promote_and_resume_after(
    tmp_path, upstreams, redis_server
):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="300ms"), redis_server.url)
    async with serving(config, 2) as processes, spread_traffic(urls(processes)) as answers:
        await until_async(lambda: statuses(processes), lambda all_: all(s["weight"] == 25 for s in all_), 30)
        redis_server.pause()
        try:
            down = await until_async(
                lambda: statuses(processes), lambda all_: all(s["backend"]["error"] for s in all_), timeout=5
            )
            served = len(answers)
            weights: list[int] = []

            async def sample() -> None:
                weights.extend(s["weight"] for s in await statuses(processes))

            for _ in range(10):  # ~2 s with Redis stopped: bakes would be due many times over
                await sample()
                await stays(lambda: True, 0.2)
            assert set(weights) == {25} and all(s["state"] == "progressing" for s in down)
            assert len(answers) > served and set(answers[served:]) == {200}  # still serving
        finally:
            redis_server.resume()
        await until_async(lambda: statuses(processes), lambda all_: all(s["weight"] == 50 for s in all_), 60)
    assert [t["weight"] for t in history(redis_server) if t["action"] == "promote"] == [25, 50]  # once each


async def test_a_canary_breaking_while_redis_is_stopped_is_rolled_back_at_once_and_recorded_after(
    tmp_path, upstreams, redis_server
):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), redis_server.url)
    async with serving(config, 2) as processes, spread_traffic(urls(processes)):
        await until_async(lambda: statuses(processes), lambda all_: all(s["weight"] == 5 for s in all_), 10)
        redis_server.pause()
        try:
            await until_async(lambda: statuses(processes), lambda all_: all(s["backend"]["error"] for s in all_), 5)
            upstreams["canary"].app[STATS].fail_ratio = 0.5
            rolled = await until_async(
                lambda: statuses(processes), lambda all_: all(s["weight"] == 0 for s in all_), timeout=30
            )
            assert all(s["state"] == "rolled_back" for s in rolled)  # each on its own evidence
        finally:
            redis_server.resume()
        await until_async(lambda: status(processes[0]), lambda s: s["backend"]["error"] is None, 10)
        recorded = await until_async(
            lambda: statuses(processes),
            lambda all_: (stored(redis_server) or {}).get("state") == "rolled_back"
            and all(s["store"]["revision"] == stored(redis_server)["revision"] for s in all_),
            timeout=10,
        )
        assert all(s["weight"] == 0 for s in recorded)
    rollbacks = [t for t in history(redis_server) if t["action"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["trigger"] == "auto"


async def test_after_flushall_or_a_restart_the_replicas_write_back_the_rollback_never_a_first_stage(
    tmp_path, upstreams, redis_server
):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), redis_server.url)
    async with serving(config, 2) as processes, spread_traffic(urls(processes)):
        await until_async(lambda: statuses(processes), lambda all_: all(s["weight"] == 5 for s in all_), 10)
        upstreams["canary"].app[STATS].fail_ratio = 0.5
        await until_async(lambda: statuses(processes), lambda all_: all(s["weight"] == 0 for s in all_), 30)
        upstreams["canary"].app[STATS].fail_ratio = 0.0
        for lose in (lambda: redis_server.client().flushall(), redis_server.restart):
            lose()
            await until(lambda: stored(redis_server) is not None, timeout=10, what="state written back")
            back = stored(redis_server)
            assert back["state"] == "rolled_back" and back["weight"] == 0
            assert [t["action"] for t in history(redis_server)][-1] == "rollback"  # history written back too
            assert all(s["weight"] == 0 for s in await statuses(processes))


async def test_a_replica_started_while_redis_is_down_serves_weight_0_says_why_and_joins_later(
    tmp_path, upstreams, redis_server
):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), redis_server.url)
    redis_server.stop()
    async with serving(config, 1) as (process,):
        alone = await status(process)
        assert alone["weight"] == 0 and "Redis at redis://127.0.0.1:" in alone["reason"]
        assert alone["backend"]["error"]
        event = await process.wait_for_event("redis_unreachable_at_start")
        assert event["weight"] == 0
        redis_server.start()
        joined = await until_async(lambda: status(process), lambda s: s["weight"] == 5, timeout=10)
        assert joined["backend"]["error"] is None and joined["lease"]["mine"]
        assert [r["id"] for r in joined["replicas"]] == [joined["replica_id"]]
    assert stored(redis_server)["weight"] == 5


def workers_config(config: Path) -> Path:
    """The same rollout with `workers: 2`: one replica made of two worker processes."""
    path = config.with_name("two-workers.yaml")
    path.write_text("workers: 2\n" + config.read_text())
    return path


async def test_three_replicas_one_with_two_workers_walk_in_lockstep_and_roll_back_together(
    tmp_path, upstreams, redis_server
):
    """Done when: three replicas (one with `workers: 2`) on one Redis with real upstreams."""
    config = redis_config(rollout_config(tmp_path, upstreams, bake="300ms"), redis_server.url)
    processes = [await ServeProcess(config).start(), await ServeProcess(config).start()]
    processes.append(await ServeProcess(workers_config(config)).start())
    stages = [0, 5, 25, 50, 100]
    try:
        async with spread_traffic(urls(processes)):
            seen: list[list[int]] = []

            def lockstep(all_: list[dict]) -> bool:
                seen.append([s["weight"] for s in all_])
                return all(s["state"] == "promoted" for s in all_)

            final = await until_async(lambda: statuses(processes), lockstep, timeout=60)
            assert len(final[2]["workers"]) == 2 and len(final[0]["replicas"]) == 3
            assert all(max(map(stages.index, w)) - min(map(stages.index, w)) <= 1 for w in seen), seen
            # the same three, a new release: a canary at 30% errors
            await admin_post_reset(processes[1])
            await until_async(lambda: statuses(processes), lambda all_: all(s["weight"] == 5 for s in all_), 10)
            upstreams["canary"].app[STATS].fail_ratio = 0.3
            rolled = await until_async(
                lambda: statuses(processes), lambda all_: all(s["weight"] == 0 for s in all_), timeout=20
            )
    finally:
        for process in processes:
            await process.kill()
    assert all(s["state"] == "rolled_back" for s in rolled)
    actions = [(t["action"], t["weight"]) for t in history(redis_server)]
    assert [w for a, w in actions if a == "promote"] == [25, 50, 100, 100]  # walked once, for all
    assert actions[-1] == ("rollback", 0) and [a for a, _ in actions].count("rollback") == 1


async def admin_post_reset(process: ServeProcess) -> None:
    status, body = await admin_post(process, "/reset", {"reason": "new release"}, token="t")
    assert status == 200, body


async def test_canary_rollback_with_every_replica_down_writes_the_rollback_into_redis(
    tmp_path, upstreams, redis_server
):
    config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), redis_server.url)
    async with serving(config, 1) as (process,):
        await until_async(lambda: status(process), lambda s: s["weight"] == 5, 10)
    result = await run_cli("rollback", "-c", str(config), "--reason", "bad release")
    assert result.code == 0, result.err
    assert f"rollback recorded in Redis at {redis_server.url} (t:shop:*)" in result.out
    assert stored(redis_server)["state"] == "rolled_back"
    async with serving(config, 1) as (process,):  # a replica started afterwards obeys it
        again = await status(process)
    assert again["weight"] == 0 and again["state"] == "rolled_back" and again["reason"] == "bad release"


async def test_a_redis_password_from_the_environment_works_and_never_shows(tmp_path, upstreams):
    secret = "pw-4f1c9e-not-for-logs"
    server = RedisServer(password=secret).start()
    try:
        url = server.url.replace("redis://", "redis://:${REDIS_PASSWORD}@")
        config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), url)
        process = ServeProcess(config, env={"REDIS_PASSWORD": secret})
        await process.start()
        try:
            shown = await until_async(lambda: status(process), lambda s: s["weight"] == 5, 10)
            await process.wait_for_event("decider_lease_taken")
        finally:
            await process.stop()
        assert shown["backend"]["url"] == f"redis://***@127.0.0.1:{server.port}/0"
        assert secret not in json.dumps(shown) and secret not in json.dumps(process.events)
        assert json.loads(server.client().get("t:shop:state"))["weight"] == 5  # it authenticated
    finally:
        server.stop()
