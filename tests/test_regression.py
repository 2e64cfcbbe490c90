"""Latency against the baseline: a canary much slower than the baseline is a warning; a
latency shift on both arms, a slightly slower canary and weight 100 are not."""

from __future__ import annotations

import random

from rollout.engine import Evidence, Policy, decide
from rollout.evidence import StageCounts, stage_latency_bin
from rollout.regression import histogram_quantile
from rollout.sprt import AnalysisState
from rollout.state import RolloutState
from rollout.verdict import judge

POLICY = Policy(stages=(5, 25, 50, 100), bake=3600.0, min_requests=100)


class Arms:
    """Both arms' cumulative stage counts, fed one second of lognormal latencies at a time."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.bins = {arm: [0] * 285 for arm in ("canary", "baseline")}
        self.requests = dict.fromkeys(self.bins, 0)

    def second(self, arm: str, n: int, scale: float) -> None:
        for _ in range(n):
            self.bins[arm][stage_latency_bin(scale * self.rng.lognormvariate(-2.3, 0.5))] += 1
        self.requests[arm] += n

    def evidence(self) -> Evidence:
        def counts(arm: str) -> StageCounts:
            return StageCounts(requests=self.requests[arm], latency_bins=tuple(self.bins[arm]))
        return Evidence(canary=counts("canary"), baseline=counts("baseline"))


def run(canary_scale: float, *, weight: int = 25, spike: tuple[int, int] = (0, 0), seconds: int = 120):
    """Tick once a second at 100 req/s; the first decision (or None) and the last analysis."""
    arms, analysis = Arms(5), AnalysisState()
    state = RolloutState(state="progressing", weight=weight, stage_started_at=0.0)
    for t in range(1, seconds + 1):
        shared = 5.0 if spike[0] <= t < spike[1] else 1.0
        arms.second("canary", round(100 * weight / 100), canary_scale * shared)
        arms.second("baseline", round(100 * (100 - weight) / 100), shared)
        state, analysis, decision = decide(state, analysis, arms.evidence(), POLICY, float(t))
        if decision is not None:
            return decision, analysis, arms.evidence()
    return None, analysis, arms.evidence()


def test_the_quantile_of_a_histogram_is_the_upper_edge_of_its_bin() -> None:
    bins = [0] * 285
    bins[stage_latency_bin(0.1)] = 95
    bins[stage_latency_bin(1.0)] = 5
    assert 0.1 <= histogram_quantile(tuple(bins), 0.95) < 0.106
    assert histogram_quantile(tuple(bins), 0.99) >= 1.0 and histogram_quantile((), 0.5) is None


def test_a_canary_twice_as_slow_as_the_baseline_is_stepped_back_with_the_figures() -> None:
    decision, _, _ = run(2.0)
    assert decision is not None and decision.transition.action == "step_back"
    assert decision.transition.reason.startswith("warning: canary latency regression:")
    assert "= max(1.5 x baseline p95" in decision.transition.reason
    test = decision.transition.evidence["tests"]["latency.regression"]
    assert test["open"] and test["estimate"] > 0.05 and test["limit_seconds"] > test["baseline_p95"]
    assert decision.transition.at < 60


def test_a_canary_a_tenth_slower_is_not_a_regression() -> None:
    decision, analysis, evidence = run(1.1, seconds=300)
    assert decision is None or decision.transition.action == "promote"
    assert not analysis.regression.open


def test_a_latency_spike_on_both_arms_is_not_a_regression() -> None:
    decision, analysis, evidence = run(1.0, spike=(40, 70), seconds=150)
    assert decision is None
    assert "latency regression" not in " ".join(judge(analysis, evidence, POLICY, 25).reasons)


def test_at_weight_100_and_when_turned_off_latency_is_not_compared() -> None:
    assert run(3.0, weight=100, seconds=60)[0] is None
    _, analysis, evidence = run(3.0, seconds=5)
    off = Policy(stages=(5, 25, 50, 100), p95_ratio=0.0)
    assert "latency.regression" not in judge(analysis, evidence, off, 25).figures["tests"]


def test_latency_histograms_of_several_processes_and_replicas_add_up() -> None:
    from rollout.replica import _add, _decode_counts, _encode_counts
    from rollout.summed import _add_stage

    one = Arms(1)
    one.second("canary", 50, 1.0)
    other = Arms(2)
    other.second("canary", 70, 2.0)
    a, b = one.evidence().canary, other.evidence().canary
    want = tuple(x + y for x, y in zip(a.latency_bins, b.latency_bins))
    assert _add_stage(a, b).latency_bins == want and _add(a, b).latency_bins == want
    assert _decode_counts(_encode_counts(a)) == a
    assert _add(a, StageCounts()).latency_bins == a.latency_bins
