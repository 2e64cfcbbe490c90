"""The figures behind a verdict, for status, decision logs and history: both arms' stage
counts, per test its sequential score and boundary beside the stage estimate and its
anytime-valid confidence interval, and the canary-minus-baseline difference."""

from __future__ import annotations

from math import erf, sqrt
from typing import Any

from rollout.confidence import bounds
from rollout.evidence import StageCounts
from rollout.health import StageHealth, rate_bounds
from rollout.policy import Evidence, Policy
from rollout.sprt import ABSOLUTE_TESTS, COMPARE_OF, COMPARE_TESTS, AnalysisState

__all__ = ["figures", "rate"]

_COMPARED = ("errors", "slow_warning", "slow_critical")


def figures(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, health: StageHealth, gate: bool,
    weight: int = 0,
) -> dict[str, Any]:
    tests = {**_absolute_tests(analysis, evidence, policy, health), **_compare_tests(analysis, evidence, policy)}
    if policy.plan.regression is not None and weight < 100:
        tests.update(_regression_tests(analysis, evidence, policy))
    return {
        "canary": _arm_figures(evidence.canary),
        "baseline": _arm_figures(evidence.baseline),
        "comparison": {"required": gate, **_difference(evidence.canary, evidence.baseline)},
        "tests": tests,
        "thresholds": {
            "errors.warning": policy.error_warning,
            "errors.critical": policy.error_critical,
            "latency.p95_warning": policy.p95_limit,
            "latency.p99_critical": policy.p99_limit,
            "analysis.min_requests": policy.analysis_min_requests,
            "analysis.beta": policy.beta,
            "latency.regression.p95_ratio": policy.p95_ratio,
            "latency.regression.min_delta": policy.min_delta,
        },
    }


def _absolute_tests(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, health: StageHealth
) -> dict[str, Any]:
    tests: dict[str, Any] = {}
    for index, name in enumerate(ABSOLUTE_TESTS):
        test = policy.plan.absolute[index]
        found = rate_bounds(evidence.canary, index, policy)
        tests[name] = {
            "estimate": None, "ci": None,
            **(found.to_json() if found else {}),
            "limit": test.p0,
            "below": health.below[index], "above": health.above[index],
            "score": round(analysis.scores[index], 3), "threshold": round(test.threshold, 3),
            "p0": test.p0, "p1": round(test.p1, 4), "open": analysis.opened[index],
            "gated_by": f"compare.{COMPARE_TESTS[COMPARE_OF[index]]}",
        }
    return tests


def _compare_tests(analysis: AnalysisState, evidence: Evidence, policy: Policy) -> dict[str, Any]:
    """Estimate: the canary's share of the arms' bad outcomes; `expected`: its share of the
    requests, which is what the share is when both arms are alike."""
    canary, baseline = evidence.canary, evidence.baseline
    requests = canary.requests + baseline.requests
    compare = policy.plan.compare
    tests: dict[str, Any] = {}
    for offset, name in enumerate(COMPARE_TESTS):
        mine, theirs = getattr(canary, _COMPARED[offset]), getattr(baseline, _COMPARED[offset])
        found = bounds(mine + theirs, mine, policy.beta)
        tests[f"compare.{name}"] = {
            "estimate": None, "ci": None,
            **(found.to_json() if found else {}),
            "expected": round(canary.requests / requests, 5) if requests else None,
            "score": round(analysis.scores[4 + offset], 3), "threshold": round(compare.threshold, 3),
            "ratio": compare.ratio, "open": analysis.opened[4 + offset],
        }
    return tests


def _regression_tests(analysis: AnalysisState, evidence: Evidence, policy: Policy) -> dict[str, Any]:
    """The latency regression's two tests: the canary's share of requests over the limit
    (vs 5%), and the canary's share of the requests over it (vs its share of requests)."""
    found, plan = analysis.regression, policy.plan.regression
    assert plan is not None
    judged, over, base_judged, base_over = found.judged
    share = bounds(over + base_over, over, policy.beta)
    requests = judged + base_judged
    return {
        "latency.regression": {
            "estimate": None, "ci": None, **_json(bounds(judged, over, policy.beta)),
            "limit": plan.rate.p0, "limit_seconds": found.limit, "baseline_p95": found.baseline_p95,
            "score": round(found.scores[0], 3), "threshold": round(plan.rate.threshold, 3),
            "open": found.open, "rate_open": found.opened[0], "gated_by": "compare.slow_regression",
        },
        "compare.slow_regression": {
            "estimate": None, "ci": None, **_json(share),
            "expected": round(judged / requests, 5) if requests else None,
            "score": round(found.scores[1], 3), "threshold": round(plan.share.threshold, 3),
            "ratio": plan.share.ratio, "open": found.opened[1],
        },
    }


def _json(found: Any) -> dict[str, Any]:
    return found.to_json() if found is not None else {}


def _arm_figures(counts: StageCounts) -> dict[str, Any]:
    return {
        "requests": counts.requests,
        "errors": counts.errors,
        "error_rate": round(rate(counts.errors, counts.requests), 5),
        "slow_warning": counts.slow_warning,
        "slow_critical": counts.slow_critical,
    }


def _difference(canary: StageCounts, baseline: StageCounts) -> dict[str, Any]:
    """Canary minus baseline error rate, with an Agresti-Caffo 95% interval (kept inside
    [-1, 1]) and the normal-approximation confidence that the canary is worse; the
    interval and the confidence are left out (None) while an arm has no requests."""
    diff = rate(canary.errors, canary.requests) - rate(baseline.errors, baseline.requests)
    if not canary.requests or not baseline.requests:
        return {"error_rate_diff": round(diff, 5), "ci95": None, "confidence_worse": None}
    pc = (canary.errors + 1) / (canary.requests + 2)
    pb = (baseline.errors + 1) / (baseline.requests + 2)
    adjusted = pc - pb
    se = sqrt(pc * (1 - pc) / (canary.requests + 2) + pb * (1 - pb) / (baseline.requests + 2))
    low, high = max(-1.0, adjusted - 1.96 * se), min(1.0, adjusted + 1.96 * se)
    return {
        "error_rate_diff": round(diff, 5),
        "ci95": [round(low, 5), round(high, 5)],
        "confidence_worse": round(0.5 * (1 + erf(adjusted / se / sqrt(2))), 4),
    }


def rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
