"""Sequential tests behind every rollout verdict, sound under continuous checking.

A fixed-window "rate > threshold" check looked at every second alarms on noise sooner or
later; a sequential probability ratio test (SPRT) does not, because its score is a
log-likelihood ratio whose exponential is a martingale under the null hypothesis, so by
Ville's inequality a score started at 0 ever reaches `log(1/alpha)` with probability at
most alpha, however often it is looked at. Two kinds of test are used:

* `RateTest`: is the canary's rate of bad outcomes (errors, or requests over a latency
  limit) at p1 rather than at the threshold p0?
* `ShareTest`: did the bad outcomes come from the canary more often than its share of the
  requests predicts (conditional binomial)? Under "both arms alike" each bad outcome is
  the canary's with probability = the canary's share of the requests, whatever the
  common rate is at that moment, so an outage shared by both arms does not move it up.

Scores are floored at 0 (a CUSUM) so a regression that starts late in a stage is caught as
fast as one that starts early. Everything here is pure arithmetic on count deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import log

from rollout.regression import RegressionPlan, RegressionState, advance_regression
from rollout.sequential import CEILING, RateTest, ShareTest, alpha_threshold, cusum

__all__ = [
    "ABSOLUTE_TESTS",
    "CEILING",
    "COMPARE_OF",
    "COMPARE_TESTS",
    "AnalysisPlan",
    "AnalysisState",
    "RateTest",
    "ShareTest",
    "advance",
    "advance_counts",
    "alpha_threshold",
    "cusum",
    "slow_could_be_critical",
]

Counts = tuple[int, int, int, int]  # requests, errors, slow_warning, slow_critical
ABSOLUTE_TESTS = ("errors.warning", "errors.critical", "latency.p95_warning", "latency.p99_critical")
COMPARE_TESTS = ("errors", "slow_warning", "slow_critical")
# which count each absolute test judges, and which comparison gates it
_COUNT_OF = (1, 1, 2, 3)
COMPARE_OF = (0, 0, 1, 2)


@dataclass(frozen=True, kw_only=True)
class AnalysisPlan:
    """The seven tests of a stage: four absolute thresholds on the canary (in
    ABSOLUTE_TESTS order) and three canary-vs-baseline comparisons (COMPARE_TESTS)."""

    absolute: tuple[RateTest, RateTest, RateTest, RateTest]
    compare: ShareTest
    regression: RegressionPlan | None = None  # latency against the baseline; None: off

    @classmethod
    def build(
        cls,
        *,
        error_warning: float,
        error_critical: float,
        alpha: float = 0.01,
        compare_alpha: float = 1e-5,
        compare_ratio: float = 3.0,
        p95_ratio: float = 0.0,
        min_delta: float = 0.0,
    ) -> AnalysisPlan:
        """Errors: H1 at twice the threshold; p95 limit: 5% vs 10% of requests over it;
        p99 limit: 1% vs 3%; latency regression (when p95_ratio > 0): 5% vs 10% of canary
        requests over the baseline-derived limit, gated like the comparisons."""
        h = alpha_threshold(alpha)
        compare = ShareTest(ratio=compare_ratio, threshold=alpha_threshold(compare_alpha))
        regression = None
        if p95_ratio > 0:
            regression = RegressionPlan(
                p95_ratio=p95_ratio, min_delta=min_delta, rate=RateTest(p0=0.05, p1=0.10, threshold=h),
                share=compare,
            )
        return cls(
            absolute=(
                RateTest.for_threshold(error_warning, ratio=2.0, threshold=h),
                RateTest.for_threshold(error_critical, ratio=2.0, threshold=h),
                RateTest(p0=0.05, p1=0.10, threshold=h),
                RateTest(p0=0.01, p1=0.03, threshold=h),
            ),
            compare=compare,
            regression=regression,
        )

    def errors_could_be_critical(self, trials: int, errors: int) -> bool:
        """Does the error-warning alarm's excursion still fit the critical alternative?

        The log-likelihood ratio of "warning-level" (p1 of errors.warning) over
        "critical-level" (p1 of errors.critical) must reach the test threshold before a
        warning may act, so a clearly broken canary waits for its rollback instead of
        being stepped back (to weight 0 from the first stage).
        """
        warning, critical = self.absolute[0], self.absolute[1]
        if critical.p1 <= warning.p1:
            return False
        llr = errors * log(warning.p1 / critical.p1) + (trials - errors) * log(
            (1.0 - warning.p1) / (1.0 - critical.p1)
        )
        return llr < warning.threshold


def slow_could_be_critical(slow_warning: int, slow_critical: int, pending: int) -> bool:
    """Are most of a latency warning's slow requests over the p99 limit or still in flight
    (so possibly critical, e.g. a hung canary)? Then the warning waits for the p99 test."""
    resolved = slow_warning - slow_critical - pending
    return resolved <= slow_critical + pending


@dataclass(frozen=True, kw_only=True)
class AnalysisState:
    """The tests' running scores for one stage, and the counts they have consumed.

    `seen` holds the canary's then the baseline's (requests, errors, slow_warning,
    slow_critical); `scores`/`opened` hold the absolute tests then the comparisons;
    `excursion` holds what the two warning tests saw since their score last left 0:
    (requests, errors) and (slow_warning, slow_critical).
    """

    seen: tuple[int, ...] = (0,) * 8
    scores: tuple[float, ...] = (0.0,) * 7
    opened: tuple[bool, ...] = (False,) * 7
    excursion: tuple[int, int, int, int] = (0, 0, 0, 0)
    regression: RegressionState = RegressionState()

    def compare_open(self, index: int) -> bool:
        """Is the comparison that gates absolute test `index` open?"""
        return self.opened[4 + COMPARE_OF[index]]

    def rescored(self) -> AnalysisState:
        """Same consumed counts, scores from 0: after the tests' parameters changed."""
        regression = replace(self.regression, scores=(0.0, 0.0), opened=(False, False))
        return AnalysisState(seen=self.seen, regression=regression)


def advance(
    state: AnalysisState, canary: Counts, baseline: Counts, plan: AnalysisPlan,
    latency: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
) -> AnalysisState:
    """`advance_counts`, then the latency regression test on both arms' stage histograms."""
    state = advance_counts(state, canary, baseline, plan)
    if plan.regression is None or not (latency[0] or state.regression.seen[0]):
        return state
    requests = canary[0] + baseline[0]
    share = canary[0] / requests if requests else 0.0
    found = advance_regression(state.regression, latency[0], latency[1], share, plan.regression)
    return replace(state, regression=found)


def advance_counts(state: AnalysisState, canary: Counts, baseline: Counts, plan: AnalysisPlan) -> AnalysisState:
    """Feed the tests the outcomes recorded since the last call (cumulative stage counts
    in; counts that went down mean the stage was reset outside, so start from 0)."""
    counts = canary + baseline
    delta = [now - before for now, before in zip(counts, state.seen)]
    if min(delta) < 0:
        state, delta = AnalysisState(), list(counts)
    if not any(delta):
        return state
    scores, opened = list(state.scores), list(state.opened)
    trials = delta[0]
    for index, test in enumerate(plan.absolute):
        llr = test.llr(trials, delta[_COUNT_OF[index]])
        scores[index], opened[index] = cusum(scores[index], opened[index], llr, test.threshold)
    compare = plan.compare
    requests = counts[0] + counts[4]
    share = counts[0] / requests if requests else 0.0
    for index in range(3):
        llr = compare.llr(share, delta[1 + index], delta[5 + index])
        slot = 4 + index
        scores[slot], opened[slot] = cusum(scores[slot], opened[slot], llr, compare.threshold)
    n, k, w, c = state.excursion
    excursion = (
        (n + trials, k + delta[1]) if scores[0] else (0, 0)
    ) + ((w + delta[2], c + delta[3]) if scores[2] else (0, 0))
    return AnalysisState(
        seen=counts, scores=tuple(scores), opened=tuple(opened), excursion=excursion,
        regression=state.regression,
    )
