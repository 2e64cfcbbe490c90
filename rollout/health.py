"""The stage's cumulative evidence per judged rate: is the canary shown below each
threshold (evidence of health, needed to promote) or past it (a signal), by the
anytime-valid confidence sequences of `rollout.confidence` at level `analysis.beta`.

The four judged rates are those of the absolute tests (ABSOLUTE_TESTS order): errors
against `errors.warning` and `errors.critical`, requests over the p95 limit against 5%,
over the p99 limit against 1%. Cheap enough for every tick (no bisection).
"""

from __future__ import annotations

from dataclasses import dataclass

from rollout.confidence import RateBounds, bounds, shown_above, shown_below
from rollout.evidence import StageCounts
from rollout.policy import Policy

__all__ = ["StageHealth", "judged_counts", "rate_bounds", "stage_health"]

Four = tuple[bool, bool, bool, bool]


@dataclass(frozen=True, kw_only=True)
class StageHealth:
    """Per absolute test: upper bound below its threshold; lower bound above it."""

    below: Four = (False, False, False, False)
    above: Four = (False, False, False, False)

    @property
    def healthy(self) -> bool:
        """Every judged rate shown below its threshold: the stage may be promoted."""
        return all(self.below)


def judged_counts(canary: StageCounts, index: int) -> tuple[int, int]:
    """(trials, bad outcomes) that absolute test `index` judges."""
    events = (canary.errors, canary.errors, canary.slow_warning, canary.slow_critical)[index]
    return canary.requests, events


def stage_health(canary: StageCounts, policy: Policy) -> StageHealth:
    below, above = [], []
    for index, test in enumerate(policy.plan.absolute):
        trials, events = judged_counts(canary, index)
        observed = events / trials if trials else test.p0
        # a bound can only be past the threshold on the side the estimate is on
        below.append(observed < test.p0 and shown_below(trials, events, test.p0, policy.beta))
        above.append(observed > test.p0 and shown_above(trials, events, test.p0, policy.beta))
    return StageHealth(below=tuple(below), above=tuple(above))  # type: ignore[arg-type]


def rate_bounds(canary: StageCounts, index: int, policy: Policy) -> RateBounds | None:
    """The estimate and confidence sequence behind absolute test `index` (for display)."""
    trials, events = judged_counts(canary, index)
    return bounds(trials, events, policy.beta)
