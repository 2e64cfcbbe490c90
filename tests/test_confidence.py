"""The stage's confidence sequences and what the verdict makes of them: promotion needs
evidence of health, a canary past a threshold is never `ok`, reasons tell the truth."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from rollout.confidence import bounds, shown_above, shown_below
from rollout.engine import Evidence, Policy, decide
from rollout.evidence import StageCounts
from rollout.sprt import AnalysisState, advance
from rollout.state import RolloutState
from rollout.verdict import judge

POLICY = Policy(stages=(5, 25, 50, 100), bake=60.0, min_requests=100)
BASELINE = StageCounts(requests=40_000, errors=400)


def _evidence(requests: int, errors: int, slow: int = 0, baseline: StageCounts = BASELINE) -> Evidence:
    return Evidence(
        canary=StageCounts(requests=requests, errors=errors, slow_warning=slow, slow_critical=slow),
        baseline=baseline,
    )


def _analysed(evidence: Evidence) -> AnalysisState:
    c, b = evidence.canary, evidence.baseline
    counts = (c.requests, c.errors, c.slow_warning, c.slow_critical)
    return advance(AnalysisState(), counts, (b.requests, b.errors, b.slow_warning, b.slow_critical), POLICY.plan)


@pytest.mark.parametrize("trials, events", [(1, 0), (20, 1), (300, 0), (1000, 80), (24_000, 1872), (50, 50)])
def test_the_interval_holds_the_estimate_and_stays_inside_0_1(trials: int, events: int) -> None:
    found = bounds(trials, events, 0.05)
    assert found is not None
    assert 0.0 <= found.lower <= found.estimate <= found.upper <= 1.0
    assert found.upper < 0.05 if shown_below(trials, events, 0.05, 0.05) else found.upper >= 0.05


def test_no_interval_without_a_single_observation() -> None:
    assert bounds(0, 0, 0.05) is None


def test_a_canary_exactly_at_the_threshold_is_rarely_shown_below_it_however_often_checked() -> None:
    """Level beta under continuous checking: 200 stages of 2,000 requests at 5%, checked
    after every request; the bound dips under 5% in at most ~beta of them."""
    rng = random.Random(7)
    dipped = 0
    for _ in range(200):
        errors = 0
        for n in range(1, 2001):
            errors += rng.random() < 0.05
            if shown_below(n, errors, 0.05, 0.05):
                dipped += 1
                break
    assert dipped <= 0.05 * 200


def test_the_bound_converges_on_the_true_rate() -> None:
    assert shown_below(2_000, 20, 0.05, 0.05)  # 1% vs 5%: long since shown healthy
    assert not shown_below(2_000, 80, 0.05, 0.05)  # 4% vs 5%: not yet at 2,000 requests
    assert shown_below(20_000, 800, 0.05, 0.05)  # ... but at 20,000
    assert shown_above(20_000, 1_600, 0.05, 0.05) and not shown_below(10**6, 75_000, 0.05, 0.05)


def test_a_healthy_canary_reads_ok_and_is_promoted_with_its_figures() -> None:
    evidence = _evidence(1_000, 10)
    state = RolloutState(state="progressing", weight=25, stage_started_at=0.0)
    new, _, decision = decide(state, AnalysisState(), evidence, POLICY, 61.0)
    assert decision is not None and new.weight == 50
    assert "healthy: every rate shown below its threshold at 95% confidence" in decision.transition.reason
    test = decision.transition.evidence["tests"]["errors.warning"]
    assert test["estimate"] == 0.01 and test["ci"][1] < 0.05 and test["below"]


@pytest.mark.parametrize("requests, errors", [(400, 30), (4_000, 300), (24_000, 1_800)])
def test_a_canary_between_the_threshold_and_twice_it_is_never_ok_nor_promoted(requests: int, errors: int) -> None:
    evidence = _evidence(requests, errors)
    analysis = replace(_analysed(evidence), scores=(0.0,) * 7, opened=(False,) * 7)  # alarms forgot
    verdict = judge(analysis, evidence, POLICY, 25)
    assert verdict.level in ("inconclusive", "warning")
    state = RolloutState(state="progressing", weight=25, stage_started_at=0.0)
    _, _, decision = decide(state, analysis, evidence, POLICY, 3600.0)
    assert decision is None or decision.transition.action != "promote"


def test_a_canary_shown_past_the_warning_reads_warning_with_its_interval() -> None:
    evidence = _evidence(24_000, 1_872)
    analysis = replace(_analysed(evidence), scores=(0.0,) * 7, opened=(False,) * 7)
    verdict = judge(analysis, evidence, POLICY, 25)
    assert verdict.level == "warning"
    assert "canary error rate 7.8% (1872/24000, CI 7.2%–8.4%) past errors.warning 5%" in verdict.reasons[0]
    assert verdict.to_json()["tests"]["errors.warning"]["above"] is True


def test_an_open_alarm_below_its_boundary_says_so_truthfully() -> None:
    evidence = _evidence(400, 30)
    analysis = _analysed(evidence)
    opened = (True, False, False, False, True, False, False)
    analysis = replace(analysis, scores=(3.4, 0.0, 0.0, 0.0, 12.0, 0.0, 0.0), opened=opened)
    reason = judge(analysis, evidence, POLICY, 25).reasons[0]
    assert "sequential alarm open since its score reached 4.6; now 3.4, clears at 0" in reason
    assert ">=" not in reason


def test_without_baseline_requests_there_is_no_difference_interval() -> None:
    evidence = _evidence(1_000, 10, baseline=StageCounts())
    comparison = judge(_analysed(evidence), evidence, POLICY, 100).figures["comparison"]
    assert comparison["ci95"] is None and comparison["confidence_worse"] is None
    ci = judge(_analysed(_evidence(30, 0)), _evidence(30, 0), POLICY, 50).figures["comparison"]["ci95"]
    assert -1.0 <= ci[0] <= ci[1] <= 1.0
