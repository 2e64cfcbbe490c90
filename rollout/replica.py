"""One replica's share of a rollout kept in Redis: counts, lease, heartbeat, notifications.

Once per tick `Replica.exchange()` makes ONE Redis round trip (a pipeline): it stores this
replica's outcome counts for the current stage (under `counts:STAGE`, so a late count for
an old stage never lands in the new one), reads every replica's counts for that stage,
reads the state, renews (or takes) the decider lease and writes a heartbeat. The
controller then judges `SharedEvidence`: the other replicas' counts from that exchange plus
this replica's own, always fresh — so when Redis stops answering the replica still judges
(and rolls back on) what it sees itself. `allows()` is the controller's gate: only the
lease holder takes a step that raises the weight; any replica may lower it.

A write by any replica is published on `events`; the listener (on the Redis link's thread)
makes every replica read the new state at once, and the per-tick read is the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from config.settings import ARMS, ArmName, Settings
from rollout.evidence import (
    STAGE_LATENCY_BINS,
    ArmSnapshot,
    ArmTotals,
    EvidenceSource,
    StageCounts,
    add_bins,
)
from rollout.redis_store import RedisLink, RedisStore, RedisUnreachable
from rollout.state import RolloutState, Transition, to_iso

__all__ = ["LEASE", "Replica", "SharedEvidence", "replica_id", "stage_key"]

log = structlog.get_logger("canary.replica")

# KEYS: lease, fence. ARGV: replica id, TTL (ms). Renews our lease, or takes a free one
# with a new fencing token; answers the holder ("REPLICA TOKEN") or nil.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder then
  if string.sub(holder, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return holder
end
local value = ARGV[1] .. ' ' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
_COUNT_FIELDS = ("requests", "errors", "slow_warning", "slow_critical")
_COUNTS_TTL_MS = 24 * 3600 * 1000
_HISTORY_TAIL = 50
_FORGET_AFTER = 3600.0  # seconds without a heartbeat before a replica's entry is deleted
_MADE = itertools.count()


def replica_id() -> str:
    """CANARY_REPLICA_ID, or HOST-PID (and -N for a second replica in one process, as
    tests run them): unique among live replicas."""
    made = next(_MADE)
    base = os.environ.get("CANARY_REPLICA_ID") or f"{socket.gethostname()}-{os.getpid()}"
    return f"{base}-{made}" if made else base


def stage_key(state: RolloutState) -> str:
    """Names one stage of the rollout: it changes whenever the controller starts new counts."""
    return f"{state.weight}@{state.stage_started_at:.3f}"


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """What one replica last wrote about itself."""

    id: str
    last_seen: float
    weight: int
    state: str
    revision: int


class Replica:
    """This process's membership in a shared rollout (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        link: RedisLink,
        store: RedisStore,
        *,
        state_of: Callable[[], RolloutState],
        local: EvidenceSource,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        ident: str | None = None,
    ) -> None:
        self.id = ident or replica_id()
        self.link, self.store, self.keys = link, store, store.keys
        self._state_of, self._local = state_of, local
        self._clock, self._monotonic = clock, monotonic
        self.interval = settings.analysis.interval
        self.ttl = max(0.5, 3 * settings.analysis.interval)
        self.holder: str | None = None  # "REPLICA TOKEN" of the lease holder, as last read
        self._lease_until = float("-inf")
        self._others: tuple[str, dict[ArmName, StageCounts]] = ("", _zero())
        self._totals: dict[ArmName, StageCounts] = _zero()
        self._replicas: list[Heartbeat] = []
        self.on_change: Callable[[], None] = lambda: None
        self._listener: Any = None
        self._refreshing = False
        self.exchanges = 0  # ticks that reached Redis

    # -- the gate and the evidence ---------------------------------------------------------
    def is_decider(self) -> bool:
        return (
            self.store.error is None and self.holder is not None
            and self.holder == self.store.lease_value and self._monotonic() < self._lease_until
        )

    def allows(self, transition: Transition) -> bool:
        """Any replica may lower the weight (or pause); only the decider raises it."""
        return transition.weight <= transition.from_weight or self.is_decider()

    def stage_counts(self) -> dict[ArmName, StageCounts]:
        """Every replica's counts for the current stage: the others' as last read, ours now."""
        own = self._local.stage_counts()
        stage, others = self._others
        if stage != stage_key(self._state_of()):
            return own
        return {arm: _add(others[arm], own[arm]) for arm in ARMS}

    # -- once per tick -------------------------------------------------------------------------
    async def exchange(self) -> bool:
        """The tick's one round trip; whether Redis answered."""
        state = self._state_of()
        stage = stage_key(state)
        own = self._local.stage_counts()
        beat = {"weight": state.weight, "state": state.state, "revision": state.revision, "last_seen": self._clock()}
        sent = self._monotonic()
        try:
            results = await self.link.acall(lambda client: self._pipeline(client, stage, own, beat))
        except RedisUnreachable as exc:
            self.store.mark_unreachable(str(exc))
            return False
        holder, counts, raw_state, heartbeats = results
        self.exchanges += 1
        self.store.mark_reachable()
        self._take_lease(holder, sent)
        self._others = (stage, _sum(counts, skip=self.id))
        self._totals = _sum(counts, skip=None)
        self._replicas = _heartbeats(heartbeats)
        await self._settle(raw_state)
        return True

    async def _pipeline(self, client: Redis, stage: str, own: Mapping[ArmName, StageCounts], beat: dict[str, Any]) -> list[Any]:
        counts = self.keys.counts(stage)
        pipe = client.pipeline(transaction=False)
        pipe.eval(LEASE, 2, self.keys.lease, self.keys.fence, self.id, int(self.ttl * 1000))
        pipe.hset(counts, self.id, json.dumps({arm: _encode_counts(own[arm]) for arm in ARMS}))
        pipe.pexpire(counts, _COUNTS_TTL_MS)
        pipe.hgetall(counts)
        pipe.get(self.keys.state)
        pipe.hset(self.keys.replicas, self.id, json.dumps(beat))
        pipe.hgetall(self.keys.replicas)
        gone = [b.id for b in self._replicas if b.last_seen < beat["last_seen"] - _FORGET_AFTER]
        if gone:  # replicas silent for an hour (restarted under a new id): forget them
            pipe.hdel(self.keys.replicas, *gone)
        holder, _set, _expire, all_counts, raw_state, _beat, heartbeats, *_ = await pipe.execute()
        return [holder, all_counts, raw_state, heartbeats]

    def _take_lease(self, holder: str | None, sent: float) -> None:
        was = self.is_decider()
        self.holder = holder
        mine = holder is not None and holder.startswith(self.id + " ")
        self.store.lease_value = holder if mine and holder else ""
        if mine:
            self._lease_until = sent + self.ttl * 0.8
        if mine and not was:
            log.info("decider_lease_taken", replica=self.id, lease=holder)
        elif was and not mine:
            log.warning("decider_lease_lost", replica=self.id, holder=holder)

    async def _settle(self, raw_state: str | None) -> None:
        """Record a rollback made while Redis was away, then take what Redis holds."""
        if self.store.unsaved is not None:
            try:
                await self.store.record_unsaved()
                raw_state = await self.link.acall(lambda client: client.get(self.keys.state))
            except RedisUnreachable as exc:
                self.store.mark_unreachable(str(exc))
                return
        self.store.observe(raw_state)
        after = self.store.stored
        if after is not None and after.state.revision != self.store.history_revision:
            try:
                pipe_result = await self.link.acall(self._history_tail)
            except RedisUnreachable:
                return
            tail, raw = pipe_result
            self.store.observe(raw)  # the state read with the tail: they belong together
            if self.store.stored is not None:
                self.store.observe_history(tail, self.store.stored.state.revision)

    async def _history_tail(self, client: Redis) -> list[Any]:
        pipe = client.pipeline(transaction=True)  # MULTI: the tail and the state of one moment
        pipe.lrange(self.keys.history, -_HISTORY_TAIL, -1)
        pipe.get(self.keys.state)
        return list(await pipe.execute())

    # -- notifications -------------------------------------------------------------------------
    def listen(self, on_change: Callable[[], None]) -> None:
        """Apply every published write at once: `on_change` runs on the caller's loop."""
        self.on_change = on_change
        loop = asyncio.get_running_loop()
        self._listener = self.link.run_task(self._listen(lambda: loop.call_soon_threadsafe(self._notified)))

    async def _listen(self, notify: Callable[[], None]) -> None:
        while True:
            pubsub = self.link.client.pubsub()
            try:
                await pubsub.subscribe(self.keys.events)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        notify()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError):  # Redis went away: subscribe again shortly
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()

    def _notified(self) -> None:
        if not self._refreshing:
            self._refreshing = True
            asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            raw = await self.link.acall(lambda client: client.get(self.keys.state))
            await self._settle(raw)
            self.on_change()
        except RedisUnreachable as exc:
            self.store.mark_unreachable(str(exc))
        finally:
            self._refreshing = False

    def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        self.link.close()

    # -- /status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        recent = self._clock() - max(10.0, 10 * self.ttl)
        holder = self.holder.rsplit(" ", 1)[0] if self.holder else None
        return {
            "replica_id": self.id,
            "replicas": [
                {
                    "id": beat.id, "last_seen": to_iso(beat.last_seen), "weight": beat.weight,
                    "state": beat.state, "decider": beat.id == holder,
                }
                for beat in self._replicas
                if beat.last_seen >= recent
            ],
            "lease": {"holder": holder, "ttl": self.ttl, "mine": self.is_decider()},
            "totals": {arm: _encode_counts(self._totals[arm]) for arm in ARMS},
            "backend": {
                "kind": "redis", "url": self.link.url, "keys": self.keys.base + "*",
                "error": self.store.error, "round_trips": self.link.round_trips, "exchanges": self.exchanges,
            },
        }


class SharedEvidence:
    """`EvidenceSource` for the controller: the replica's sum for decisions, the local
    source for everything this process reports (its own window, totals, in-flight)."""

    def __init__(self, local: EvidenceSource, replica: Replica) -> None:
        self.local, self.replica = local, replica

    @property
    def arms(self) -> Mapping[ArmName, ArmTotals]:
        return self.local.arms

    def sweep(self, now: float) -> None:
        self.local.sweep(now)

    def stage_counts(self) -> dict[ArmName, StageCounts]:
        return self.replica.stage_counts()

    def snapshot(self, now: float) -> dict[ArmName, ArmSnapshot]:
        return self.local.snapshot(now)

    def reset_stage(self) -> None:
        self.local.reset_stage()


def _zero() -> dict[ArmName, StageCounts]:
    return {arm: StageCounts() for arm in ARMS}


def _add(a: StageCounts, b: StageCounts) -> StageCounts:
    summed = {f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(StageCounts) if f.name != "latency_bins"}
    return StageCounts(**summed, latency_bins=add_bins(a.latency_bins, b.latency_bins))


def _encode_counts(counts: StageCounts) -> dict[str, Any]:
    """The counts, and the stage latency histogram as {bin: count} (only non-empty bins)."""
    encoded: dict[str, Any] = {name: getattr(counts, name) for name in _COUNT_FIELDS}
    if counts.latency_bins:
        encoded["latency_bins"] = {str(i): n for i, n in enumerate(counts.latency_bins) if n}
    return encoded


def _decode_counts(data: Mapping[str, Any]) -> StageCounts:
    bins = data.get("latency_bins") or {}
    histogram = [0] * STAGE_LATENCY_BINS
    for index, n in bins.items():
        histogram[int(index)] = int(n)
    return StageCounts(
        **{k: int(data[k]) for k in _COUNT_FIELDS}, latency_bins=tuple(histogram) if bins else ()
    )


def _sum(raw: Mapping[str, str], *, skip: str | None) -> dict[ArmName, StageCounts]:
    total = _zero()
    for ident, text in raw.items():
        if ident == skip:
            continue
        try:
            data = json.loads(text)
            counts = {arm: _decode_counts(data[arm]) for arm in ARMS}
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("replica_counts_unreadable", replica=ident)
            continue
        total = {arm: _add(total[arm], counts[arm]) for arm in ARMS}
    return total


def _heartbeats(raw: Mapping[str, str]) -> list[Heartbeat]:
    beats = []
    for ident, text in sorted(raw.items()):
        try:
            data = json.loads(text)
            beats.append(Heartbeat(
                id=ident, last_seen=float(data["last_seen"]), weight=int(data["weight"]),
                state=str(data["state"]), revision=int(data["revision"]),
            ))
        except (ValueError, TypeError, KeyError):
            continue
    return beats
