"""The sum of every worker process's outcomes: the evidence source of a supervisor.

Each worker records outcomes in its own process (O(1) per request, as with one process)
and, once per analysis tick, sends a `WorkerReport`: its cumulative counts, the stage
counts tagged with the stage id it applies, its window histogram. `SummedEvidence` adds
them up for the rollout controller, `/status` and `/metrics`:

* stage counts only from reports tagged with the current stage id, so a report that
  arrives late for an old stage never pollutes the new one;
* a worker that exits keeps its last report in the totals (a Prometheus counter never goes
  backwards when a worker restarts) and, within the same stage, in the stage counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from config.settings import ARMS, ArmName
from rollout.evidence import (
    CODE_CLASSES,
    LATENCY_EDGES,
    ArmRecorder,
    ArmSnapshot,
    StageCounts,
    WindowCounts,
    add_bins,
    arm_snapshot,
)

__all__ = ["ArmReport", "ArmSum", "SummedEvidence", "WorkerReport", "report_of"]

_NO_CODES = (0,) * len(CODE_CLASSES)
_NO_LATENCIES = (0,) * (len(LATENCY_EDGES) + 1)


@dataclass(frozen=True, kw_only=True)
class ArmReport:
    """One arm of one worker: cumulative totals since the worker started, its current
    stage counts and its window."""

    stage: StageCounts = StageCounts()
    window: WindowCounts = WindowCounts()
    code_totals: tuple[int, ...] = _NO_CODES
    latency_totals: tuple[int, ...] = _NO_LATENCIES
    latency_sum: float = 0.0
    inflight: int = 0


@dataclass(frozen=True, kw_only=True)
class WorkerReport:
    stage_id: int  # the supervisor's stage the `stage` counts belong to
    arms: Mapping[ArmName, ArmReport] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)  # other cumulative counts by name

    @property
    def requests(self) -> int:
        return sum(sum(arm.code_totals) for arm in self.arms.values())


def report_of(
    recorders: Mapping[ArmName, ArmRecorder], stage_id: int, now: float, counters: Mapping[str, int]
) -> WorkerReport:
    """A worker's report from its own recorders (after `sweep`) and other counters."""
    return WorkerReport(
        stage_id=stage_id,
        counters=dict(counters),
        arms={
            arm: ArmReport(
                stage=recorder.stage_counts(),
                window=recorder.window_counts(now),
                code_totals=tuple(recorder.code_totals),
                latency_totals=tuple(recorder.latency_totals),
                latency_sum=recorder.latency_sum,
                inflight=recorder.inflight,
            )
            for arm, recorder in recorders.items()
        },
    )


@dataclass(frozen=True, kw_only=True)
class ArmSum:
    """One arm's cumulative totals over every worker (what `/metrics` exports)."""

    code_totals: tuple[int, ...] = _NO_CODES
    latency_totals: tuple[int, ...] = _NO_LATENCIES
    latency_sum: float = 0.0
    inflight: int = 0

    def plus(self, report: ArmReport, *, live: bool) -> ArmSum:
        return ArmSum(
            code_totals=_add(self.code_totals, report.code_totals),
            latency_totals=_add(self.latency_totals, report.latency_totals),
            latency_sum=self.latency_sum + report.latency_sum,
            inflight=self.inflight + (report.inflight if live else 0),
        )


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _add_stage(a: StageCounts, b: StageCounts) -> StageCounts:
    return StageCounts(
        requests=a.requests + b.requests,
        errors=a.errors + b.errors,
        slow_warning=a.slow_warning + b.slow_warning,
        slow_critical=a.slow_critical + b.slow_critical,
        slow_pending=a.slow_pending + b.slow_pending,
        latency_bins=add_bins(a.latency_bins, b.latency_bins),
    )


def _add_window(a: WindowCounts, b: WindowCounts) -> WindowCounts:
    if not a.bins or not b.bins:
        bins = a.bins or b.bins
    else:
        bins = _add(a.bins, b.bins)
    return WindowCounts(requests=a.requests + b.requests, errors=a.errors + b.errors, bins=bins)


class SummedEvidence:
    """Implements `rollout.evidence.EvidenceSource` over the workers' reports.

    `on_new_stage` is called by `reset_stage` (the controller's transition) so the pool
    can tell every worker the new stage id together with the new weight."""

    def __init__(self, *, on_new_stage: Callable[[int], None] = lambda _stage: None) -> None:
        self.stage_id = 0
        self._on_new_stage = on_new_stage
        self._live: dict[int, WorkerReport] = {}  # worker slot -> its newest report
        self._retired_totals = {arm: ArmSum() for arm in ARMS}
        self._retired_stage = {arm: StageCounts() for arm in ARMS}  # exited workers, this stage
        self._retired_counters: dict[str, int] = {}

    # -- from the worker pool ---------------------------------------------------------
    def receive(self, slot: int, report: WorkerReport) -> None:
        self._live[slot] = report

    def retire(self, slot: int) -> None:
        """The worker in `slot` exited: keep its last counts (the next one starts at 0)."""
        report = self._live.pop(slot, None)
        if report is None:
            return
        for name, value in report.counters.items():
            self._retired_counters[name] = self._retired_counters.get(name, 0) + value
        for arm, counts in report.arms.items():
            self._retired_totals[arm] = self._retired_totals[arm].plus(counts, live=False)
            if report.stage_id == self.stage_id:
                self._retired_stage[arm] = _add_stage(self._retired_stage[arm], counts.stage)

    def requests_of(self, slot: int) -> int:
        report = self._live.get(slot)
        return report.requests if report else 0

    def counters(self) -> dict[str, int]:
        """The other cumulative counters (e.g. fallbacks by kind), summed, never backwards."""
        sums = dict(self._retired_counters)
        for report in self._live.values():
            for name, value in report.counters.items():
                sums[name] = sums.get(name, 0) + value
        return sums

    # -- EvidenceSource ---------------------------------------------------------------
    @property
    def arms(self) -> dict[ArmName, ArmSum]:
        sums = dict(self._retired_totals)
        for report in self._live.values():
            for arm, counts in report.arms.items():
                sums[arm] = sums[arm].plus(counts, live=True)
        return sums

    def sweep(self, now: float) -> None:
        """Nothing to do here: each worker sweeps its own requests before it reports."""

    def stage_counts(self) -> dict[ArmName, StageCounts]:
        counts = dict(self._retired_stage)
        for report in self._live.values():
            if report.stage_id != self.stage_id:
                continue  # late, for an earlier stage
            for arm, arm_report in report.arms.items():
                counts[arm] = _add_stage(counts[arm], arm_report.stage)
        return counts

    def snapshot(self, now: float) -> dict[ArmName, ArmSnapshot]:
        stage = self.stage_counts()
        window = {arm: WindowCounts() for arm in ARMS}
        inflight = dict.fromkeys(ARMS, 0)
        for report in self._live.values():
            for arm, arm_report in report.arms.items():
                window[arm] = _add_window(window[arm], arm_report.window)
                inflight[arm] += arm_report.inflight
        return {arm: arm_snapshot(arm, stage[arm], window[arm], inflight[arm]) for arm in ARMS}

    def reset_stage(self) -> None:
        self.stage_id += 1
        self._retired_stage = {arm: StageCounts() for arm in ARMS}
        self._on_new_stage(self.stage_id)
