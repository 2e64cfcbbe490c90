"""Latency against the baseline (`analysis.latency.regression`): is the canary's p95 more
than `p95_ratio` x the baseline's current p95 and at least `min_delta` slower?

Each tick, before looking at the new requests, the limit is set from the baseline's
recent requests (its last REFERENCE_TICKS ticks' stage histograms, at least
REFERENCE_MIN of them): L = max(p95_ratio x baseline p95, baseline p95 + min_delta).
Then the new requests of both arms in histogram bins wholly above L count as "over":

* `rate`, an SPRT of the canary's share of requests over L: 5% (H0, the canary's p95 at
  exactly the limit) against 10%. L is fixed before the requests it judges are seen, so
  each canary request is over it with probability p_t <= 5% under H0 and the score's
  exponential stays a supermartingale. Counting only wholly-over bins errs towards "not
  over". What can push p_t above 5% under H0 is a baseline p95 estimated too low from
  REFERENCE_MIN+ requests — or a latency shift between the reference and now;
* `share`, the conditional binomial test of the baseline comparison: under "both arms
  alike at this moment" each request over L is the canary's with probability = its
  share of the requests, whatever L and whatever the shared latency is. A spike on both
  arms, or an unlucky L, sends both arms over alike and does not move it up.

The signal is open only when both are: the canary is past the ratio (rate) and slower
than the baseline at the same moment (share). Either test alone is bounded by its own
alpha under its own H0, so the pair is too. Pure arithmetic on stage histograms (summed
counts of several processes add up).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from rollout.evidence import STAGE_LATENCY_EDGES, add_bins
from rollout.sequential import RateTest, ShareTest, cusum

__all__ = [
    "REFERENCE_MIN",
    "REFERENCE_TICKS",
    "RegressionPlan",
    "RegressionState",
    "advance_regression",
    "histogram_quantile",
]

REFERENCE_TICKS = 30  # "current": the baseline's requests of the last 30 analysis ticks
REFERENCE_MIN = 100  # fewer baseline requests than that: no limit, nothing judged
Bins = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class RegressionPlan:
    p95_ratio: float
    min_delta: float
    rate: RateTest
    share: ShareTest

    def limit(self, baseline_p95: float) -> float:
        return max(self.p95_ratio * baseline_p95, baseline_p95 + self.min_delta)


@dataclass(frozen=True, kw_only=True)
class RegressionState:
    """Consumed histograms, the baseline's recent per-tick histograms, the current limit,
    the stage totals judged (canary requests, canary over, baseline requests, baseline
    over), and the two tests' scores and alarms (rate, share)."""

    seen: tuple[Bins, Bins] = ((), ())
    recent: tuple[Bins, ...] = ()
    reference: Bins = ()  # the sum of `recent`
    limit: float | None = None
    baseline_p95: float | None = None
    judged: tuple[int, int, int, int] = (0, 0, 0, 0)
    scores: tuple[float, float] = (0.0, 0.0)
    opened: tuple[bool, bool] = (False, False)

    @property
    def open(self) -> bool:
        return all(self.opened)


def advance_regression(
    state: RegressionState, canary: Bins, baseline: Bins, share: float, plan: RegressionPlan
) -> RegressionState:
    """Judge the requests finished since the last call against the limit set before them,
    then set the limit for the next call from the baseline's recent requests."""
    new_canary, new_baseline = _delta(canary, state.seen[0]), _delta(baseline, state.seen[1])
    if new_canary is None or new_baseline is None:  # counts went down: a fresh stage
        return advance_regression(RegressionState(), canary, baseline, share, plan)
    scores, opened, judged = list(state.scores), list(state.opened), state.judged
    if state.limit is not None:
        first_over = bisect_left(STAGE_LATENCY_EDGES, state.limit) + 1
        n_c, over_c = sum(new_canary), sum(new_canary[first_over:])
        n_b, over_b = sum(new_baseline), sum(new_baseline[first_over:])
        scores[0], opened[0] = cusum(scores[0], opened[0], plan.rate.llr(n_c, over_c), plan.rate.threshold)
        llr = plan.share.llr(share, over_c, over_b)
        scores[1], opened[1] = cusum(scores[1], opened[1], llr, plan.share.threshold)
        judged = (judged[0] + n_c, judged[1] + over_c, judged[2] + n_b, judged[3] + over_b)
    recent, reference = state.recent, state.reference
    if any(new_baseline):
        recent, reference = (*recent, new_baseline), add_bins(reference, new_baseline)
        if len(recent) > REFERENCE_TICKS:
            reference = tuple(a - b for a, b in zip(reference, recent[0]))
            recent = recent[1:]
    p95 = histogram_quantile(reference, 0.95) if sum(reference) >= REFERENCE_MIN else None
    return RegressionState(
        seen=(canary, baseline), recent=recent, reference=reference, limit=None if p95 is None else plan.limit(p95),
        baseline_p95=p95, judged=judged, scores=(scores[0], scores[1]), opened=(opened[0], opened[1]),
    )


def histogram_quantile(bins: Bins, q: float) -> float | None:
    """The q-quantile of a stage histogram: the upper edge of the bin that holds it (so the
    limit errs high, towards "not a regression")."""
    total = sum(bins)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, n in enumerate(bins):
        seen += n
        if n and seen >= rank:
            return STAGE_LATENCY_EDGES[min(index, len(STAGE_LATENCY_EDGES) - 1)]
    return STAGE_LATENCY_EDGES[-1]


def _delta(now: Bins, before: Bins) -> Bins | None:
    if not before:
        return now
    if not now:
        return None if any(before) else ()
    delta = tuple(a - b for a, b in zip(now, before))
    return None if min(delta) < 0 else delta

