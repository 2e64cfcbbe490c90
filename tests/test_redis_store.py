"""`RedisStore` against a real redis-server: fenced writes, append-only history, a
deposed decider refused, a rollback kept while Redis is away, data loss written back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from config.errors import StateError
from config.settings import RedisSettings
from rollout.redis_store import RedisKeys, RedisLink, RedisStore, offline_store
from rollout.state import RolloutState, Transition
from rollout.store import Stored, Write, record_offline_rollback

NOW = 1_700_000_000.0


def transition(action: str, from_weight: int, weight: int, trigger: str = "auto") -> Transition:
    state = "rolled_back" if action == "rollback" else "progressing"
    return Transition(
        at=NOW, action=action, trigger=trigger, from_state="progressing", state=state,  # type: ignore[arg-type]
        from_weight=from_weight, weight=weight, reason=action,
    )


def progressing(weight: int, revision: int = 0) -> RolloutState:
    return RolloutState(state="progressing", weight=weight, stage_started_at=NOW, revision=revision)


@pytest.fixture
def stores(redis_server):
    links: list[RedisLink] = []

    def make() -> RedisStore:
        link = RedisLink(RedisSettings(url=redis_server.url, timeout=0.5))
        links.append(link)
        store = RedisStore(link, RedisKeys.of("canary", "test"))
        store.prime()
        return store

    yield make
    for link in links:
        link.close()


def write_on(expected: int, write: Write):
    def change(current: Stored | None) -> Write | None:
        return write if (current.state.revision if current else 0) == expected else None

    return change


def test_a_write_computed_from_a_stale_revision_is_refused_and_the_newer_state_kept(stores, redis_server):
    a, b = stores(), stores()
    first = a.update(write_on(0, Write(state=progressing(5), transitions=(transition("start", 0, 5, "config"),))))
    assert first is not None and first.state.revision == 1
    # b has not read since: its change is computed on "nothing stored" and must not win
    stored = b.update(write_on(0, Write(state=progressing(50), transitions=(transition("set_weight", 0, 50, "operator"),))))
    assert stored is not None and stored.state.weight == 5 and stored.state.revision == 1
    assert [t.action for t in a.history()] == ["start"]
    assert json.loads(redis_server.client().get("canary:test:state"))["weight"] == 5


def test_a_promotion_needs_the_lease_a_rollback_does_not(stores):
    store = stores()
    store.update(write_on(0, Write(state=progressing(5))))
    store.lease_value = "someone-else 7"  # what this replica believes; Redis holds no such lease
    with pytest.raises(StateError, match="lease"):
        store.update(write_on(1, Write(state=progressing(25), transitions=(transition("promote", 5, 25),))))
    rolled = RolloutState(state="rolled_back", weight=0, stage_started_at=NOW)
    stored = store.update(write_on(1, Write(state=rolled, transitions=(transition("rollback", 5, 0),))))
    assert stored is not None and stored.state.state == "rolled_back" and stored.state.revision == 2
    assert [t.action for t in store.history()] == ["rollback"]


def test_a_rollback_made_while_redis_is_stopped_is_recorded_when_it_answers(stores, redis_server):
    import asyncio

    a, b = stores(), stores()
    a.update(write_on(0, Write(state=progressing(5))))
    b.prime()
    redis_server.pause()
    try:
        with pytest.raises(StateError, match="did not answer"):
            b.update(write_on(1, Write(state=progressing(25), transitions=(transition("promote", 5, 25, "operator"),))))
        assert b.unsaved is None  # a promotion is simply not made
        rolled = RolloutState(state="rolled_back", weight=0, stage_started_at=NOW, revision=1)
        with pytest.raises(StateError):
            b.update(write_on(1, Write(state=rolled, transitions=(transition("rollback", 5, 0),))))
        assert b.unsaved is not None
    finally:
        redis_server.resume()
    # meanwhile a stale decider promoted; the rollback recorded afterwards still wins
    a.update(write_on(1, Write(state=progressing(25), transitions=(transition("promote", 5, 25, "operator"),))))
    asyncio.run(b.record_unsaved())
    a.prime()
    assert a.load() is not None and a.load().state.state == "rolled_back"
    assert [t.action for t in a.history()] == ["promote", "rollback"]


def test_after_flushall_the_newest_known_state_and_history_are_written_back(stores, redis_server):
    store = stores()
    store.update(write_on(0, Write(state=progressing(5), transitions=(transition("start", 0, 5, "config"),))))
    rolled = RolloutState(state="rolled_back", weight=0, stage_started_at=NOW, revision=1)
    store.update(write_on(1, Write(state=rolled, transitions=(transition("rollback", 5, 0),))))
    redis_server.client().flushall()
    store.prime()
    assert store.load() is None  # what the controller sees: it writes back what it knew
    ours = replace(rolled, revision=2)
    stored = store.update(lambda current: Write(state=ours) if current is None else None)
    assert stored is not None and stored.state.state == "rolled_back" and stored.state.revision == 2
    assert [t.action for t in store.history()] == ["start", "rollback"]


def test_an_older_revision_in_redis_counts_as_lost_data(stores, redis_server):
    store = stores()
    for revision in range(3):
        store.update(write_on(revision, Write(state=progressing(5 + revision))))
    redis_server.client().set("canary:test:state", json.dumps(progressing(5, revision=1).to_json()))
    store.prime()
    assert store.load() is None  # never adopted: the controller writes back revision 3


def test_offline_rollback_with_every_replica_down_writes_into_redis(tmp_path, redis_server):
    from config.loader import parse_settings

    settings = parse_settings(
        f"""upstreams: {{baseline: {{url: "http://127.0.0.1:1"}}, canary: {{url: "http://127.0.0.1:2"}}}}
rollout: {{name: shop}}
state: {{backend: redis, redis: {{url: "{redis_server.url}", key_prefix: cp}}}}
""",
        filename="c.yaml", base_dir=tmp_path, env={},
    )
    store, where, close = offline_store(settings)
    try:
        stored = record_offline_rollback(store, reason="bad deploy", now=NOW)
    finally:
        close()
    assert "cp:shop:" in where and stored.state.state == "rolled_back"
    assert json.loads(redis_server.client().get("cp:shop:state"))["state"] == "rolled_back"
    assert redis_server.client().llen("cp:shop:history") == 1


def test_a_wrong_password_is_reported_as_refused_credentials_not_silence():
    from tests.redis_server import RedisServer

    server = RedisServer(password="right-one").start()
    link = RedisLink(RedisSettings(url=f"redis://:wrong-one@127.0.0.1:{server.port}/0", timeout=0.5))
    try:
        with pytest.raises(StateError) as caught:
            RedisStore(link, RedisKeys.of("canary", "test")).prime()
    finally:
        link.close()
        server.stop()
    message = str(caught.value)
    assert "refused the credentials" in message and "did not answer" not in message
    assert "wrong-one" not in message and "right-one" not in message
