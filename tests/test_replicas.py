"""Replicas on one real Redis are one rollout: summed evidence, one decider, lockstep."""

from __future__ import annotations

from tests.polling import until
from tests.replica_support import redis_config, replicas, spread_traffic
from tests.test_rollout_e2e import rollout_config
from tests.upstreams import STATS


def urls(servers) -> list[str]:
    return [f"http://127.0.0.1:{s.proxy_port}/v1/chat/completions" for s in servers]


async def test_two_replicas_walk_a_healthy_canary_through_every_stage_in_lockstep(tmp_path, upstreams, redis_server):
    config = redis_config(rollout_config(tmp_path, upstreams), redis_server.url)
    async with replicas(config, config) as servers, spread_traffic(urls(servers)):
        a, b = servers
        seen: list[tuple[int, int]] = []

        def both_promoted() -> bool:
            seen.append((a.weight(), b.weight()))
            return all(s.controller.state.state == "promoted" for s in servers)

        await until(both_promoted, timeout=60, what="both replicas promoted")
        history = a.controller.history()
        history_b = b.controller.history()
        deciders = [s.replica.is_decider() for s in servers]
    assert [t["weight"] for t in history if t["action"] == "promote"] == [25, 50, 100, 100]
    assert history == history_b  # one rollout, one history
    assert sorted(deciders) == [False, True]  # one lease holder
    # lockstep: the two never served stages further apart than one step
    stages = [5, 25, 50, 100]
    assert all(abs(stages.index(x) - stages.index(y)) <= 1 for x, y in seen if x in stages and y in stages)


async def test_a_30_percent_error_canary_is_rolled_back_on_every_replica(tmp_path, upstreams, redis_server):
    upstreams["canary"].app[STATS].fail_ratio = 0.3
    config = redis_config(rollout_config(tmp_path, upstreams, bake="1h"), redis_server.url)
    async with replicas(config, config) as servers, spread_traffic(urls(servers)):
        await until(lambda: all(s.weight() == 0 for s in servers), timeout=60, what="every replica at 0")
        history = servers[0].controller.history()
        status = [s.replica.status() for s in servers]
    rollbacks = [t for t in history if t["action"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["trigger"] == "auto"  # decided once, for all
    assert {r["id"] for r in status[0]["replicas"]} == {s["replica_id"] for s in status}
    assert sum(r["decider"] for r in status[1]["replicas"]) == 1


async def test_a_command_on_one_replica_reaches_the_others_by_notification_not_the_next_tick(
    tmp_path, upstreams, redis_server
):
    config = rollout_config(tmp_path, upstreams, bake="1h")
    config.write_text(config.read_text().replace("interval: 50ms", "interval: 10s"))  # polling: every 10 s
    config = redis_config(config, redis_server.url)
    async with replicas(config, config, config) as servers:
        a, b, c = servers
        await until(lambda: all(s.weight() == 5 for s in servers), timeout=5, what="first stage everywhere")
        a.controller.set_weight(40, reason="operator on replica a")  # what POST /weight does
        await until(lambda: b.weight() == 40 and c.weight() == 40, timeout=3, what="the others follow")
        c.controller.rollback(reason="operator on replica c")
        await until(lambda: a.weight() == 0 and b.weight() == 0, timeout=3, what="rollback everywhere")
        actions = [t["action"] for t in b.controller.history()]
    assert actions == ["start", "set_weight", "rollback"]
