"""The sequential tests: their arithmetic, their latch, and their error rates."""

from __future__ import annotations

import math
import random

import pytest

from rollout.sprt import (
    CEILING,
    AnalysisState,
    RateTest,
    ShareTest,
    AnalysisPlan,
    advance,
    alpha_threshold,
    cusum,
    slow_could_be_critical,
)

PLAN = AnalysisPlan.build(error_warning=0.05, error_critical=0.10)
H = alpha_threshold(0.01)


def test_alpha_threshold_is_log_one_over_alpha() -> None:
    assert alpha_threshold(0.01) == pytest.approx(math.log(100))
    with pytest.raises(ValueError):
        alpha_threshold(1.5)


def test_rate_test_llr_per_outcome() -> None:
    test = RateTest(p0=0.05, p1=0.10, threshold=H)
    assert test.llr(1, 1) == pytest.approx(math.log(2))
    assert test.llr(1, 0) == pytest.approx(math.log(0.90 / 0.95))
    assert test.llr(100, 7) == pytest.approx(7 * math.log(2) + 93 * math.log(0.90 / 0.95))


def test_rate_test_keeps_h1_below_one_for_high_thresholds() -> None:
    test = RateTest.for_threshold(0.6, ratio=2.0, threshold=H)
    assert 0.6 < test.p1 < 1.0


@pytest.mark.parametrize("p0, p1", [(0.0, 0.1), (0.2, 0.1), (0.5, 1.0)])
def test_rate_test_rejects_impossible_hypotheses(p0: float, p1: float) -> None:
    with pytest.raises(ValueError):
        RateTest(p0=p0, p1=p1, threshold=H)


def test_cusum_floors_at_zero_and_latches_until_back_at_zero() -> None:
    assert cusum(1.0, False, -3.0, H) == (0.0, False)
    value, opened = cusum(4.0, False, 1.0, H)
    assert opened and value == 5.0
    value, opened = cusum(value, opened, -2.0, H)  # below the threshold, still open
    assert opened and value == 3.0
    assert cusum(value, opened, -3.0, H) == (0.0, False)


def test_cusum_is_capped_so_an_alarm_clears_after_bounded_health() -> None:
    value, _ = cusum(0.0, False, 1000.0, H)
    assert value == CEILING * H


def test_one_unlucky_error_in_a_small_sample_never_opens_a_test() -> None:
    for test in PLAN.absolute:
        value, opened = cusum(0.0, False, test.llr(20, 1), test.threshold)
        assert not opened


def test_fresh_sprt_at_h0_crosses_the_threshold_with_probability_at_most_alpha() -> None:
    """Ville's inequality, checked by simulation: no floor, unlimited looks."""
    test = RateTest(p0=0.05, p1=0.10, threshold=H)
    rng = random.Random(7)
    crossed = 0
    runs = 2000
    for _ in range(runs):
        score = 0.0
        for _ in range(400):
            score += test.llr(1, rng.random() < 0.05)
            if score >= H:
                crossed += 1
                break
    assert crossed / runs <= 0.01


def test_share_test_moves_up_only_when_the_canary_takes_more_than_its_share() -> None:
    compare = ShareTest(ratio=3.0, threshold=alpha_threshold(1e-5))
    assert compare.llr(0.05, 5, 95) < 0  # errors split like the traffic: evidence of "alike"
    assert compare.llr(0.05, 50, 50) > 0  # half the errors from 5% of the traffic
    assert compare.llr(0.0, 3, 3) == 0.0  # no canary traffic: no information
    assert compare.llr(0.5, 0, 0) == 0.0


def test_share_test_under_h0_has_negative_drift_whatever_the_error_rate() -> None:
    compare = ShareTest(ratio=3.0, threshold=alpha_threshold(1e-5))
    for share in (0.05, 0.25, 0.5, 0.95):
        drift = share * compare.llr(share, 1, 0) + (1 - share) * compare.llr(share, 0, 1)
        assert drift < 0


def _feed(state: AnalysisState, steps: list[tuple[int, int, int, int]]) -> AnalysisState:
    canary = [0, 0, 0, 0]
    for delta in steps:
        canary = [c + d for c, d in zip(canary, delta)]
        baseline = (canary[0] * 19, canary[0] * 19 // 100, 0, 0)
        state = advance(state, tuple(canary), baseline, PLAN)  # type: ignore[arg-type]
    return state


def test_advance_consumes_only_new_counts() -> None:
    state = _feed(AnalysisState(), [(50, 15, 0, 0)])
    again = advance(state, state.seen[:4], state.seen[4:], PLAN)  # type: ignore[arg-type]
    assert again is state
    assert state.opened[0] and state.opened[1]  # 30% errors: both error tests open


def test_advance_restarts_when_the_counts_were_reset_outside() -> None:
    state = _feed(AnalysisState(), [(50, 15, 0, 0)])
    fresh = advance(state, (10, 0, 0, 0), (190, 1, 0, 0), PLAN)
    assert fresh.seen == (10, 0, 0, 0, 190, 1, 0, 0)
    assert not any(fresh.opened)


def test_a_late_regression_is_caught_as_fast_as_an_early_one() -> None:
    healthy = [(10, 0, 0, 0)] * 500  # 5000 clean requests first
    late = _feed(AnalysisState(), healthy + [(10, 3, 0, 0)] * 4)
    early = _feed(AnalysisState(), [(10, 3, 0, 0)] * 4)
    assert late.scores[1] == pytest.approx(early.scores[1])
    assert late.opened[1] == early.opened[1]


def test_errors_could_be_critical_until_the_excursion_rules_it_out() -> None:
    assert PLAN.errors_could_be_critical(50, 10)  # 20%: fits the critical level
    assert not PLAN.errors_could_be_critical(400, 34)  # 8.5% over 400 requests: warning level
    assert PLAN.errors_could_be_critical(40, 3)  # too little to tell


def test_slow_requests_still_in_flight_could_be_critical() -> None:
    assert slow_could_be_critical(30, 0, 30)  # a hung canary: all pending
    assert slow_could_be_critical(30, 20, 0)  # most are over the p99 limit
    assert not slow_could_be_critical(30, 0, 5)  # most finished between the limits
