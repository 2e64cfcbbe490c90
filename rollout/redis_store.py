"""The rollout state in Redis (`state.backend: redis`): one rollout shared by every replica.

Keys, all under `PREFIX:NAME:` (`state.redis.key_prefix`, `rollout.name`):

- `state`: the `RolloutState` as JSON, `revision` counting writes;
- `history`: a list, one JSON transition per item, only ever appended to;
- `lease` / `fence`: the decider lease (`"REPLICA TOKEN"`, with a TTL) and the counter its
  tokens come from (see `rollout.replica`);
- `replicas`: a hash, replica id -> its last heartbeat;
- `counts:STAGE`: a hash, replica id -> that replica's outcome counts for one stage;
- channel `events`: the revision of every write, so replicas apply it at once.

`RedisStore` keeps the `StateStore` interface the controller already uses. It answers
`load()` and `version()` from a mirror that `rollout.replica` refreshes once per tick (and
on every notification), so the controller never waits on Redis to read; `update()` writes
through `WRITE`, a Lua script that stores the state, appends the history and publishes in
one atomic step, and only if the stored revision is the one the change was computed from
(and, for an automatic promotion, only while the writer holds the lease): a deposed
decider's or a stale replica's write is refused. A rollback that cannot be written because
Redis does not answer is kept and written by `record_unsaved` when it answers again.

Every Redis call runs on one background thread's event loop (`RedisLink`) with the
`redis` package's asyncio client, so the async tick awaits it and the controller's
synchronous writes wait at most `state.redis.timeout`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from config.errors import StateCorrupt, StateError
from config.settings import RedisSettings, Settings, redact_url
from rollout.state import RolloutState, Transition
from rollout.store import (
    RECENT_HISTORY,
    Change,
    JsonFileStore,
    StateStore,
    Stored,
    Write,
)

__all__ = ["RedisKeys", "RedisLink", "RedisStore", "RedisUnreachable", "offline_store"]

T = TypeVar("T")
log = structlog.get_logger("canary.redis")

# KEYS: state, history, lease, events. ARGV: mode (cas|restore|rollback), expected
# revision, required lease value ("" = none), restore revision, state JSON, number of seed
# items, seed items (the history to write back into an empty list), transitions.
WRITE = """
local current = redis.call('GET', KEYS[1])
local revision = 0
local rolled_back = false
if current then
  local stored = cjson.decode(current)
  revision = tonumber(stored['revision']) or 0
  rolled_back = stored['state'] == 'rolled_back'
end
local mode = ARGV[1]
local new = revision + 1
if mode == 'restore' then
  new = tonumber(ARGV[4])
  if current and revision >= new then return {0, revision} end
elseif mode == 'rollback' then
  if rolled_back then return {0, revision} end
  new = math.max(revision, tonumber(ARGV[4])) + 1
elseif revision ~= tonumber(ARGV[2]) then
  return {0, revision}
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then return {-1, revision} end
local state = cjson.decode(ARGV[5])
state['revision'] = new
redis.call('SET', KEYS[1], cjson.encode(state))
local seeds = tonumber(ARGV[6])
if seeds > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  for i = 7, 6 + seeds do redis.call('RPUSH', KEYS[2], ARGV[i]) end
end
for i = 7 + seeds, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('PUBLISH', KEYS[4], tostring(new))
return {1, new}
"""
_WRITTEN, _STALE, _NOT_DECIDER = 1, 0, -1


class RedisUnreachable(StateError):
    """Redis did not answer (or answered with an error) within `state.redis.timeout`."""


@dataclass(frozen=True)
class RedisKeys:
    """Every key of one rollout: `PREFIX:NAME:...`."""

    base: str

    @classmethod
    def of(cls, prefix: str, name: str) -> RedisKeys:
        return cls(f"{prefix}:{name}:")

    @property
    def state(self) -> str:
        return self.base + "state"

    @property
    def history(self) -> str:
        return self.base + "history"

    @property
    def lease(self) -> str:
        return self.base + "lease"

    @property
    def fence(self) -> str:
        return self.base + "fence"

    @property
    def replicas(self) -> str:
        return self.base + "replicas"

    @property
    def events(self) -> str:
        return self.base + "events"

    def counts(self, stage: str) -> str:
        return f"{self.base}counts:{stage}"


class RedisLink:
    """One asyncio Redis client on its own thread's event loop: awaited from the proxy's
    loop (`acall`), waited for from synchronous code (`call`), never blocking the proxy
    longer than `timeout` per call (no retries: the caller decides)."""

    def __init__(self, settings: RedisSettings) -> None:
        self.url = redact_url(settings.url)
        self.timeout = settings.timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="canary-redis", daemon=True)
        self._thread.start()
        self._closed = False
        self.round_trips = 0  # every call made (the notification listener's reads aside)
        self.client: Redis = Redis.from_url(
            settings.url, socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
        )

    def submit(self, call: Callable[[Redis], Awaitable[T]]) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RedisUnreachable(f"Redis at {self.url}: the connection is closed (the proxy is stopping)")
        self.round_trips += 1  # one command or one pipeline: one round trip

        async def run() -> T:
            return await asyncio.wait_for(call(self.client), self.timeout * 2)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def call(self, call: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `call` and wait for it; RedisUnreachable when Redis does not answer."""
        try:
            return self.submit(call).result(self.timeout * 2 + 1)
        except (TimeoutError, RedisError, OSError, concurrent.futures.TimeoutError) as exc:
            raise self.unreachable(exc) from exc

    async def acall(self, call: Callable[[Redis], Awaitable[T]]) -> T:
        try:
            return await asyncio.wrap_future(self.submit(call))
        except (TimeoutError, RedisError, OSError) as exc:
            raise self.unreachable(exc) from exc

    def unreachable(self, exc: BaseException) -> RedisUnreachable:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, AuthenticationError) or isinstance(exc.__cause__, AuthenticationError):
            return RedisUnreachable(f"Redis at {self.url} refused the credentials: {detail} (check the password in state.redis.url)")
        return RedisUnreachable(f"Redis at {self.url} did not answer: {detail}")

    def run_task(self, coro: Awaitable[None]) -> concurrent.futures.Future[None]:
        """Run a long-lived coroutine (the notification listener) on the link's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            await self.client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(self.timeout * 2)
        except (RedisError, OSError, TimeoutError, concurrent.futures.TimeoutError) as exc:
            log.info("redis_close_failed", url=self.url, error=str(exc) or type(exc).__name__)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            self._loop.close()  # else its __del__ prints a traceback at exit (offline rollback)


class RedisStore:
    """`StateStore` on Redis: reads from the mirror, writes fenced by revision and lease."""

    def __init__(self, link: RedisLink, keys: RedisKeys) -> None:
        self.link, self.keys = link, keys
        self._mirror: Stored | None = None
        self._known = False  # the mirror holds what Redis said (at least once)
        self.error: str | None = None  # why Redis is not answering, or None
        self.lease_value = ""  # "REPLICA TOKEN" while this replica holds the lease
        self.high_water = 0  # the highest revision seen: Redis going below it lost data
        self.unsaved: Write | None = None  # a rollback made while Redis did not answer
        self.known_history: tuple[Transition, ...] = ()  # the newest transitions seen, kept across data loss
        self.history_revision = -1  # the revision `known_history` is up to date with

    # -- StateStore ----------------------------------------------------------------------
    def load(self) -> Stored | None:
        if not self._known:
            raise RedisUnreachable(self.error or f"Redis at {self.link.url} was not read yet")
        return self._mirror

    def prime(self) -> None:
        """Read the state once (without a running replica, e.g. `canary rollback -c FILE`)."""
        self._observe(self.link.call(self._get_state))

    def version(self) -> Hashable:
        if not self._known:
            return ("unknown", self.error)
        return ("absent",) if self._mirror is None else ("revision", self._mirror.state.revision)

    def history(self) -> list[Transition]:
        items = self.link.call(lambda client: client.lrange(self.keys.history, 0, -1))
        return [transition for transition in map(_transition, items) if transition is not None]

    def update(self, change: Change) -> Stored | None:
        if self.error is not None or not self._known:
            return self._refuse(change, RedisUnreachable(self.error or f"Redis at {self.link.url} was not read yet"))
        try:
            for _attempt in range(3):
                current = self._mirror
                write = change(current)
                if write is None:
                    return current
                outcome, revision = self.link.call(
                    lambda client, current=current, write=write: self._write(client, current, write)
                )
                if outcome == _WRITTEN:
                    return self._written(write, revision)
                if outcome == _NOT_DECIDER:
                    raise StateError("this replica no longer holds the decider lease; the decider decides")
                self._observe(self.link.call(self._get_state))
        except RedisUnreachable as exc:
            self.mark_unreachable(str(exc))
            return self._refuse(change, exc)
        return self._mirror

    # -- the replica's side ------------------------------------------------------------------
    def observe(self, raw: str | None) -> None:
        """What Redis holds now (from the tick's pipeline or a notification)."""
        self._observe(raw)

    def observe_history(self, items: list[str], revision: int) -> None:
        """The newest stored transitions, read with revision `revision` stored."""
        history = tuple(t for t in map(_transition, items) if t is not None)
        self.history_revision = revision
        if self._mirror is not None and history:
            self._mirror = replace(self._mirror, history=history)
            self.known_history = history

    def mark_unreachable(self, error: str) -> None:
        if self.error is None:
            log.error("redis_unreachable", error=error)
        self.error = error

    def mark_reachable(self) -> None:
        if self.error is not None:
            log.info("redis_reachable", url=self.link.url)
        self.error = None

    @property
    def stored(self) -> Stored | None:
        return self._mirror

    async def record_unsaved(self) -> None:
        """Write the rollback made while Redis did not answer (unless Redis holds one)."""
        write = self.unsaved
        if write is None:
            return
        outcome, revision = await self.link.acall(lambda client: self._write(client, None, write, mode="rollback"))
        self.unsaved = None
        log.warning("rollout_rollback_recorded", revision=revision, written=outcome == _WRITTEN)

    # -- internals ---------------------------------------------------------------------------
    def _refuse(self, change: Change, exc: StateError) -> Stored | None:
        """Redis does not answer: keep a rollback to record later, then refuse."""
        write = change(self._mirror) if self._known else None
        if write is not None and write.state.state == "rolled_back":
            self.unsaved = write
        raise exc

    def _written(self, write: Write, revision: int) -> Stored:
        before = self._mirror.history if self._mirror else self.known_history  # after data loss: the seeds
        stored = Stored(
            state=replace(write.state, revision=revision),
            history=(*before, *write.transitions)[-RECENT_HISTORY:],
        )
        self._known, self.high_water = True, max(self.high_water, revision)
        self._mirror = replace(stored, version=("revision", revision))
        self.known_history, self.history_revision = self._mirror.history, revision
        return self._mirror

    async def _get_state(self, client: Redis) -> str | None:
        return await client.get(self.keys.state)

    async def _write(self, client: Redis, current: Stored | None, write: Write, *, mode: str = "") -> list[int]:
        if not mode:
            mode = "restore" if current is None and not write.transitions and write.state.revision else "cas"
        expected = current.state.revision if current else 0
        promotes = any(t.trigger == "auto" and t.weight > t.from_weight for t in write.transitions)
        seeds = [_encode(t) for t in self.known_history] if current is None else []
        args = [
            mode, expected, self.lease_value if promotes else "",
            max(write.state.revision, self.high_water), json.dumps(write.state.to_json()),
            len(seeds), *seeds, *(_encode(t) for t in write.transitions),
        ]
        keys = [self.keys.state, self.keys.history, self.keys.lease, self.keys.events]
        result = await client.eval(WRITE, len(keys), *keys, *args)
        return [int(result[0]), int(result[1])]

    def _observe(self, raw: str | None) -> None:
        self._known = True
        if raw is None:
            self._mirror = None
            return
        try:
            state = RolloutState.from_json(json.loads(raw))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateCorrupt(
                f"Redis key {self.keys.state}: the rollout state cannot be read ({type(exc).__name__}: {exc}); "
                f"it is kept as it is and nothing is written until it is fixed or deleted"
            ) from exc
        if state.revision < self.high_water:
            self._mirror = None  # Redis lost data (or was restored from an old copy): write back ours
            return
        self.high_water = state.revision
        if self._mirror is not None and self._mirror.state == state:
            return
        self._mirror = Stored(state=state, history=self.known_history, version=("revision", state.revision))


def offline_store(settings: Settings) -> tuple[StateStore, str, Callable[[], None]]:
    """The configured store for a write without a running proxy (`canary rollback -c
    FILE`): the store, where it is (for messages, no password) and how to close it."""
    state = settings.state
    if state.backend == "file":
        return JsonFileStore(state.path), str(state.path), lambda: None
    link = RedisLink(state.redis)
    store = RedisStore(link, RedisKeys.of(state.redis.key_prefix, settings.rollout.name))
    try:
        store.prime()
    except StateError:
        link.close()
        raise
    return store, f"Redis at {link.url} ({store.keys.base}*)", link.close


def _encode(transition: Transition) -> str:
    return json.dumps(transition.to_json(), separators=(",", ":"))


def _transition(item: str) -> Transition | None:
    try:
        return Transition.from_json(json.loads(item))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
