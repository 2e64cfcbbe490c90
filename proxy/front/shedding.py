"""Requests the proxy refuses for want of its own resources, counted and logged.

A request shed here never counts against an arm: the proxy ran out of connections,
descriptors, memory or upstream pool slots, not the upstream out of health. The totals
feed `canary_shed_total{reason}`; the log says so at most once a second per reason (a
flood of refusals must not become a flood of log lines).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

import structlog

__all__ = ["RETRY_AFTER", "SHED_REASONS", "ShedReason", "Shedding"]

log = structlog.get_logger("canary.shed")

ShedReason = Literal["max_connections", "descriptors", "memory", "pool_exhausted"]
SHED_REASONS: tuple[ShedReason, ...] = ("max_connections", "descriptors", "memory", "pool_exhausted")
RETRY_AFTER = "1"  # seconds a refused client is told to wait
_LOG_EVERY = 1.0


class Shedding:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.totals: Counter[str] = Counter()
        self._clock = clock
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def shed(self, reason: ShedReason, detail: str = "") -> None:
        self.totals[reason] += 1
        self._unlogged[reason] += 1
        now = self._clock()
        if now - self._logged_at.get(reason, float("-inf")) >= _LOG_EVERY:
            self._logged_at[reason] = now
            count, self._unlogged[reason] = self._unlogged[reason], 0
            log.warning("load_shed", reason=reason, refused=count, total=self.totals[reason], detail=detail)

    def snapshot(self) -> dict[str, int]:
        return {reason: self.totals.get(reason, 0) for reason in SHED_REASONS}
