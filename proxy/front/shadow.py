"""Mirroring during the shadow stage (CONTRACT §8): copies of eligible client requests go to
the canary, whose answers are discarded and whose outcomes are recorded as the canary's.

The client's own exchange with the baseline never waits for a copy: a copy is taken once
the client's body is known (at once without a body; for a body up to
`routing.fallback.max_body`, when the baseline has read the last of it) and handed to a
bounded queue drained by at most `concurrency` sends of its own. A full queue drops the
copy and counts it (`canary_shadow_dropped_total{reason}`).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web
from multidict import CIMultiDict

from config.errors import PoolExhausted, UpstreamError
from config.settings import RolloutSettings, Settings
from proxy.front.fallback import KeptBody
from proxy.front.routing import RoutingSnapshot
from proxy.upstream.base import Transport
from rollout.evidence import ArmRecorder

__all__ = ["DROP_REASONS", "SHADOW_HEADER", "Mirror", "MirrorLimits"]

log = structlog.get_logger("canary.shadow")
SHADOW_HEADER = "X-Canary-Shadow"  # on every copy, so the canary can tell one from a user's request
DROP_REASONS = ("queue_full", "body_too_large", "pool_exhausted")
_SENT = "shadow:mirrored"
_DROPPED = "shadow:dropped:"


@dataclass(frozen=True, kw_only=True)
class MirrorLimits:
    """How much mirroring may hold at once: copies in flight, copies waiting, body size."""

    concurrency: int = 20
    queue: int = 100
    max_body: int = 1024 * 1024


    @classmethod
    def from_settings(cls, settings: Settings) -> MirrorLimits:
        """As many copies in flight as the canary's pool allows, as many again waiting."""
        connections = settings.upstreams.canary.pool.max_connections
        return cls(concurrency=connections, queue=connections, max_body=settings.routing.fallback.max_body)


@dataclass(frozen=True, kw_only=True)
class _Copy:
    method: str
    target: str
    headers: CIMultiDict[str]
    body: KeptBody | None


class Mirror:
    """The shadow stage's copies: which requests are mirrored, the queue, the sends and
    their counts. Mirrors only while the router's snapshot says `shadow`."""

    def __init__(
        self,
        *,
        recorder: ArmRecorder,
        transport: Callable[[], Transport],
        clock: Callable[[], float],
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._recorder = recorder
        self._transport = transport
        self._clock = clock
        self._rng = rng
        self._queue: deque[_Copy] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0  # copies whose outcome was recorded
        self.dropped: dict[str, int] = {reason: 0 for reason in DROP_REASONS}
        self.configure(RolloutSettings(), MirrorLimits())

    def configure(self, rollout: RolloutSettings, limits: MirrorLimits) -> None:
        self.share = rollout.shadow_share
        self.methods = frozenset(rollout.shadow_methods)
        self.limits = limits

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    # -- the request path ---------------------------------------------------------------
    def wants(self, request: web.BaseRequest, snapshot: RoutingSnapshot) -> bool:
        """An eligible request (in the split, not forced, a mirrored method), sampled."""
        return (
            request.method in self.methods
            and snapshot.takes_part(request.path)
            and not snapshot.forced(request.headers)
            and (self.share >= 100 or self._rng() * 100 < self.share)
        )

    def offer(
        self, request: web.BaseRequest, target: str, headers: CIMultiDict[str], body: AsyncIterable[bytes] | None
    ) -> AsyncIterable[bytes] | None:
        """Take a copy of the request; returns the body to send to the baseline (the same
        bytes, watched so that the copy goes out once the last of them has passed)."""
        copy_headers = CIMultiDict(headers)
        copy_headers[SHADOW_HEADER] = "1"
        method = request.method
        if body is None:
            self._submit(_Copy(method=method, target=target, headers=copy_headers, body=None))
            return None
        length = request.content_length
        if length is not None and length > self.limits.max_body:
            self.dropped["body_too_large"] += 1
            return body

        def complete(data: bytes | None) -> None:
            if data is None:
                self.dropped["body_too_large"] += 1
            else:
                self._submit(_Copy(method=method, target=target, headers=copy_headers, body=KeptBody(data)))

        return _WatchedBody(body, self.limits.max_body, complete)

    def _submit(self, copy: _Copy) -> None:
        if len(self._tasks) < self.limits.concurrency:
            self._start(copy)
        elif len(self._queue) < self.limits.queue:
            self._queue.append(copy)
        else:
            self.dropped["queue_full"] += 1

    def _start(self, copy: _Copy) -> None:
        task = asyncio.get_running_loop().create_task(self._send(copy))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shadow_copy_failed", error=task.exception().__class__.__name__)
        if self._queue and len(self._tasks) < self.limits.concurrency:
            self._start(self._queue.popleft())

    # -- one copy -------------------------------------------------------------------------
    async def _send(self, copy: _Copy) -> None:
        """Send a copy, read and discard the answer, record the outcome as the canary's."""
        recorder, clock = self._recorder, self._clock
        request_id = recorder.begin(clock())
        try:
            upstream = await self._transport().send(copy.method, copy.target, copy.headers, copy.body)
        except PoolExhausted:
            recorder.abandon(request_id)  # the proxy's own limit, not the canary's fault
            self.dropped["pool_exhausted"] += 1
            return
        except UpstreamError as exc:
            recorder.finish(request_id, exc.status, clock(), proxy_error=True)
            self.sent += 1
            return
        except BaseException:
            recorder.abandon(request_id)
            raise
        recorder.headers_received(request_id, clock())
        try:
            if upstream.complete_body() is None:
                async for _chunk in upstream.iter_body():
                    pass
        except UpstreamError as exc:
            recorder.finish(request_id, exc.status, clock(), proxy_error=True)
        except BaseException:
            recorder.abandon(request_id)
            raise
        else:
            recorder.finish(request_id, upstream.status, clock())
        finally:
            await upstream.aclose()
        self.sent += 1

    # -- figures -----------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The cumulative counts as named counters (a worker reports them to its supervisor)."""
        return {_SENT: self.sent, **{_DROPPED + reason: n for reason, n in self.dropped.items()}}

    def absorb(self, counters: Mapping[str, int]) -> None:
        """Show counts summed over worker processes (the supervisor mirrors nothing itself)."""
        self.sent = counters.get(_SENT, 0)
        for reason in DROP_REASONS:
            self.dropped[reason] = counters.get(_DROPPED + reason, 0)

    def status(self) -> dict[str, object]:
        return {
            "share": self.share,
            "methods": sorted(self.methods),
            "mirrored": self.sent,
            "dropped": dict(self.dropped),
            "inflight": self.inflight,
            "queued": self.queued,
            "limits": {"concurrency": self.limits.concurrency, "queue": self.limits.queue},
        }

    async def close(self) -> None:
        """Drop what waits, stop what is in flight (at shutdown)."""
        self._queue.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _WatchedBody:
    """The client's body on its way to the baseline, chunk by chunk as before; a copy of
    up to `limit` bytes is kept and handed to `complete` once the last chunk has passed
    (None when the body was larger)."""

    def __init__(self, source: AsyncIterable[bytes], limit: int, complete: Callable[[bytes | None], None]) -> None:
        self._source = source.__aiter__()
        self._limit = limit
        self._complete = complete
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._source.__anext__()
        except StopAsyncIteration:
            self._finish()
            raise
        if self._chunks is not None:
            self._size += len(chunk)
            if self._size > self._limit:
                self._chunks = None
            else:
                self._chunks.append(chunk)
        return chunk

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._complete(None if self._chunks is None else b"".join(self._chunks))
