"""Per-arm outcome counters: what the proxy records and the rollout engine judges.

The proxy calls `ArmRecorder.begin` / `finish` / `abandon` once per request; each is O(1)
with plain integer arithmetic (no locks, no allocation beyond one small list), so the hot
path stays tiny. Three views are kept:

* **stage counters** (requests, errors, slow requests) since the last weight change —
  the input of the sequential tests; requests still in flight past a latency limit are
  counted as slow by `sweep` while they hang;
* a **sliding window** (a ring of time buckets, each with a latency histogram) for the
  error rate and p50/p95/p99 shown in status and on the dashboard;
* **cumulative totals** (by code class, latency histogram) exported as Prometheus metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from math import ceil, log
from dataclasses import dataclass
from itertools import count
from typing import Iterator, Mapping, Protocol, Sequence

from config.settings import ARMS, ArmName

__all__ = [
    "CODE_CLASSES",
    "LATENCY_EDGES",
    "PROMETHEUS_BUCKETS",
    "ArmRecorder",
    "ArmSnapshot",
    "ArmTotals",
    "EvidenceSource",
    "OutcomeRecorder",
    "STAGE_LATENCY_BINS",
    "STAGE_LATENCY_EDGES",
    "StageCounts",
    "add_bins",
    "stage_latency_bin",
    "WindowCounts",
    "arm_snapshot",
]

# Latency histogram bin edges (seconds): 1 ms .. 750 s, ~25% apart, so a percentile
# read from the histogram is within one bin (<= 25%) of the true value.
_MANTISSAS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5)
LATENCY_EDGES: tuple[float, ...] = tuple(
    round(m * 10.0**e, 6) for e in range(-3, 3) for m in _MANTISSAS
)
PROMETHEUS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 100.0,
)
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
_ERROR_CLASS = 4
_BUCKETS_PER_WINDOW = 60
# stage latency histogram: 1 ms .. ~1,000 s, each edge 5% above the previous one
_STAGE_FIRST_EDGE = 0.001
_STAGE_LOG_STEP = log(1.05)
_STAGE_BINS = STAGE_LATENCY_BINS = 285
STAGE_LATENCY_EDGES: tuple[float, ...] = tuple(_STAGE_FIRST_EDGE * 1.05**i for i in range(_STAGE_BINS - 1))
_SLOW_WARN = 1
_SLOW_CRIT = 2


def _code_class(status: int) -> int:
    if status < 300:
        return 0
    if status < 400:
        return 1
    return 2 if status < 500 else 3


@dataclass(frozen=True, kw_only=True)
class StageCounts:
    """Canary or baseline outcomes since the last weight change (the tests' input)."""

    requests: int = 0
    errors: int = 0
    slow_warning: int = 0  # over analysis.latency.p95_warning
    slow_critical: int = 0  # over analysis.latency.p99_critical
    slow_pending: int = 0  # in flight past the p95 limit, not (yet) past p99: at last sweep
    # finished requests by latency, over STAGE_LATENCY_EDGES (5% apart), for the latency
    # regression test; () when none finished yet
    latency_bins: tuple[int, ...] = ()


def stage_latency_bin(latency: float) -> int:
    """The STAGE_LATENCY_EDGES bin of a latency: bin i holds (edge[i-1], edge[i]]. O(1)."""
    if latency <= _STAGE_FIRST_EDGE:
        return 0
    return min(_STAGE_BINS - 1, ceil(log(latency / _STAGE_FIRST_EDGE) / _STAGE_LOG_STEP - 1e-9))


def add_bins(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Two stage histograms added (either may be empty)."""
    if not a or not b:
        return a or b
    return tuple(x + y for x, y in zip(a, b))


@dataclass(frozen=True, kw_only=True)
class ArmSnapshot:
    """One arm's figures at one moment, for status, decisions and the dashboard."""

    arm: ArmName
    stage: StageCounts
    requests: int  # in the sliding window
    errors: int
    error_rate: float
    p50: float | None
    p95: float | None
    p99: float | None
    inflight: int


@dataclass(frozen=True, kw_only=True)
class WindowCounts:
    """One arm's sliding-window outcomes: the latency histogram over LATENCY_EDGES."""

    requests: int = 0
    errors: int = 0
    bins: tuple[int, ...] = ()


class ArmTotals(Protocol):
    """One arm's cumulative totals as the Prometheus metrics read them."""

    @property
    def code_totals(self) -> Sequence[int]: ...  # by CODE_CLASSES

    @property
    def latency_totals(self) -> Sequence[int]: ...  # by LATENCY_EDGES bin

    @property
    def latency_sum(self) -> float: ...

    @property
    def inflight(self) -> int: ...


class EvidenceSource(Protocol):
    """What the rollout controller reads: one process's recorder, the sum of a machine's
    workers, or (with a shared backend) the sum of every replica. `reset_stage` starts
    new stage counters everywhere the source gathers from."""

    @property
    def arms(self) -> Mapping[ArmName, ArmTotals]: ...

    def sweep(self, now: float) -> None: ...

    def stage_counts(self) -> dict[ArmName, StageCounts]: ...

    def snapshot(self, now: float) -> dict[ArmName, ArmSnapshot]: ...

    def reset_stage(self) -> None: ...


class _WindowBucket:
    __slots__ = ("slot", "requests", "errors", "bins")

    def __init__(self) -> None:
        self.slot = -1
        self.requests = 0
        self.errors = 0
        self.bins = [0] * (len(LATENCY_EDGES) + 1)


class ArmRecorder:
    """All outcome counters of one arm. Not thread-safe: one event loop owns it."""

    def __init__(self, arm: ArmName, *, window: float, warn_limit: float, crit_limit: float) -> None:
        self.arm = arm
        self.warn_limit = warn_limit
        self.crit_limit = crit_limit
        self.generation = 0
        self._ids = count()
        # id -> [start, generation, slow flags, latency once the response headers came]
        self._inflight: dict[int, list] = {}
        self._stage = [0, 0, 0, 0]  # requests, errors, slow_warning, slow_critical
        self._stage_bins = [0] * _STAGE_BINS
        self._slow_pending = 0
        self.code_totals = [0] * len(CODE_CLASSES)
        self.latency_totals = [0] * (len(LATENCY_EDGES) + 1)
        self.latency_sum = 0.0
        self.set_window(window)

    def set_window(self, window: float) -> None:
        self.window = window
        self._span = window / _BUCKETS_PER_WINDOW
        self._ring = [_WindowBucket() for _ in range(_BUCKETS_PER_WINDOW)]

    # -- hot path -------------------------------------------------------------------
    def begin(self, now: float) -> int:
        request_id = next(self._ids)
        self._inflight[request_id] = [now, self.generation, 0, None]
        return request_id

    def headers_received(self, request_id: int, now: float) -> None:
        """Latency is time to response headers (time to first token for SSE), so a long
        stream is not a slow request; its outcome is still recorded when it ends."""
        entry = self._inflight.get(request_id)
        if entry is not None and entry[3] is None:
            entry[3] = now - entry[0]

    def finish(self, request_id: int, status: int, now: float, *, proxy_error: bool = False) -> None:
        """Record a completed request; `proxy_error` marks a 502/503/504 the proxy made."""
        start, generation, flags, latency = self._inflight.pop(request_id)
        if latency is None:
            latency = now - start
        error = proxy_error or status >= 500
        self.code_totals[_ERROR_CLASS if proxy_error else _code_class(status)] += 1
        bin_index = bisect_left(LATENCY_EDGES, latency)
        self.latency_totals[bin_index] += 1
        self.latency_sum += latency
        bucket = self._bucket(now)
        bucket.requests += 1
        bucket.bins[bin_index] += 1
        if error:
            bucket.errors += 1
        if generation == self.generation:
            stage = self._stage
            if not flags:
                stage[0] += 1
            if error:
                stage[1] += 1
            if latency > self.warn_limit and not flags & _SLOW_WARN:
                stage[2] += 1
            if latency > self.crit_limit and not flags & _SLOW_CRIT:
                stage[3] += 1
            self._stage_bins[stage_latency_bin(latency)] += 1

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def abandon(self, request_id: int) -> None:
        """The client went away: not an outcome of the upstream, so not counted."""
        self._inflight.pop(request_id, None)

    def _bucket(self, now: float) -> _WindowBucket:
        slot = int(now / self._span)
        bucket = self._ring[slot % _BUCKETS_PER_WINDOW]
        if bucket.slot != slot:
            bucket.slot = slot
            bucket.requests = bucket.errors = 0
            bucket.bins = [0] * (len(LATENCY_EDGES) + 1)
        return bucket

    # -- tick path ------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Count requests hanging past a latency limit as slow observations, once each."""
        stage = self._stage
        youngest_slow = min(self.warn_limit, self.crit_limit)
        pending = 0
        for entry in self._inflight.values():
            start, generation, flags, latency = entry
            age = now - start
            if age <= youngest_slow:
                break  # insertion order = start order: the rest are younger
            if generation != self.generation or latency is not None:
                continue
            if not flags:
                stage[0] += 1
            if age > self.warn_limit and not flags & _SLOW_WARN:
                stage[2] += 1
                flags |= _SLOW_WARN
            if age > self.crit_limit and not flags & _SLOW_CRIT:
                stage[3] += 1
                flags |= _SLOW_CRIT
            if flags == _SLOW_WARN:
                pending += 1
            entry[2] = flags
        self._slow_pending = pending

    def reset_stage(self) -> None:
        """Start new stage counters (at every weight change); in-flight requests of the
        old stage no longer count toward the new one."""
        self.generation += 1
        self._stage = [0, 0, 0, 0]
        self._stage_bins = [0] * _STAGE_BINS
        self._slow_pending = 0

    def stage_counts(self) -> StageCounts:
        r, e, w, c = self._stage
        return StageCounts(
            requests=r, errors=e, slow_warning=w, slow_critical=c, slow_pending=self._slow_pending,
            latency_bins=tuple(self._stage_bins) if any(self._stage_bins) else (),
        )

    def window_counts(self, now: float) -> WindowCounts:
        current = int(now / self._span)
        live = [b for b in self._ring if current - _BUCKETS_PER_WINDOW < b.slot <= current]
        bins = tuple(sum(column) for column in zip(*(b.bins for b in live))) if live else ()
        return WindowCounts(
            requests=sum(b.requests for b in live), errors=sum(b.errors for b in live), bins=bins
        )

    def snapshot(self, now: float) -> ArmSnapshot:
        return arm_snapshot(self.arm, self.stage_counts(), self.window_counts(now), self.inflight)


def arm_snapshot(arm: ArmName, stage: StageCounts, window: WindowCounts, inflight: int) -> ArmSnapshot:
    """An arm's figures from its stage and window counts (one process's or a sum)."""
    requests, errors, bins = window.requests, window.errors, list(window.bins)
    return ArmSnapshot(
        arm=arm,
        stage=stage,
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests else 0.0,
        p50=percentile(bins, 0.50),
        p95=percentile(bins, 0.95),
        p99=percentile(bins, 0.99),
        inflight=inflight,
    )


def percentile(bins: list[int], q: float) -> float | None:
    """The q-quantile of a histogram over LATENCY_EDGES, interpolated inside its bin."""
    total = sum(bins)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, n in enumerate(bins):
        if n and seen + n >= rank:
            low = LATENCY_EDGES[index - 1] if index > 0 else 0.0
            high = LATENCY_EDGES[index] if index < len(LATENCY_EDGES) else low * 1.25
            return low + (high - low) * (rank - seen) / n
        seen += n
    return LATENCY_EDGES[-1]


class OutcomeRecorder:
    """Both arms' recorders, configured from the analysis settings."""

    def __init__(self, *, window: float = 60.0, warn_limit: float = 5.0, crit_limit: float = 10.0) -> None:
        self.arms: dict[ArmName, ArmRecorder] = {
            arm: ArmRecorder(arm, window=window, warn_limit=warn_limit, crit_limit=crit_limit)
            for arm in ARMS
        }

    def __iter__(self) -> Iterator[ArmRecorder]:
        return iter(self.arms.values())

    def configure(self, *, window: float, warn_limit: float, crit_limit: float) -> None:
        for recorder in self:
            if recorder.window != window:
                recorder.set_window(window)
            recorder.warn_limit = warn_limit
            recorder.crit_limit = crit_limit

    def sweep(self, now: float) -> None:
        for recorder in self:
            recorder.sweep(now)

    def reset_stage(self) -> None:
        for recorder in self:
            recorder.reset_stage()

    def stage_counts(self) -> dict[ArmName, StageCounts]:
        return {arm: recorder.stage_counts() for arm, recorder in self.arms.items()}

    def snapshot(self, now: float) -> dict[ArmName, ArmSnapshot]:
        return {arm: recorder.snapshot(now) for arm, recorder in self.arms.items()}
