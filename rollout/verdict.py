"""Turn the tests' scores into a verdict: a level, reasons a person can act on, and the
figures behind them (both arms' counts and rates, each test's score and threshold, the
canary-minus-baseline difference and its confidence) for status, logs and history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import erf, sqrt
from typing import Any

from rollout.evidence import StageCounts
from rollout.policy import Evidence, Policy
from rollout.sprt import (
    ABSOLUTE_TESTS,
    COMPARE_OF,
    COMPARE_TESTS,
    AnalysisState,
    slow_could_be_critical,
)
from rollout.state import Level, Severity

__all__ = ["RANK", "Severity", "Verdict", "assess", "judge", "warning_waits"]

RANK: dict[str | None, int] = {None: 0, "ok": 0, "insufficient_data": 0, "warning": 1, "critical": 2}
_SEVERITY: tuple[Severity, ...] = ("warning", "critical", "warning", "critical")
_PAST = {"rollback": "rolled back", "step_back": "stepped back", "pause": "paused"}
_ACTION_RANK = {"pause": 0, "step_back": 1, "rollback": 2}


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The analysis of the current stage, whether or not it leads to an action."""

    level: Level
    reasons: tuple[str, ...]
    figures: Mapping[str, Any]
    confirmed: Severity | None = None  # the level that passed the baseline gate

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "reasons": list(self.reasons), "evidence": dict(self.figures)}


def assess(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, weight: int
) -> tuple[Level, Severity | None]:
    """The verdict level, and the level confirmed for action: past the baseline gate, and
    for a warning, no longer possibly critical. Cheap: called every tick."""
    if evidence.canary.requests < policy.analysis_min_requests:
        return "insufficient_data", None
    gate = policy.compare_baseline and weight < 100
    level: Level = "ok"
    confirmed: Severity | None = None
    for index, severity in enumerate(_SEVERITY):
        if not analysis.opened[index]:
            continue
        if RANK[severity] > RANK[level]:
            level = severity
        if gate and not analysis.compare_open(index):
            continue
        if severity == "warning" and warning_waits(index, analysis, evidence.canary, policy):
            continue
        if RANK[severity] > RANK[confirmed]:
            confirmed = severity
    return level, confirmed


def warning_waits(index: int, analysis: AnalysisState, canary: StageCounts, policy: Policy) -> bool:
    """A warning whose evidence still fits the critical level waits for the critical test
    (when that one acts more strongly), so a broken canary is rolled back, not stepped back."""
    if _ACTION_RANK[policy.on_critical] <= _ACTION_RANK[policy.on_warning]:
        return False
    trials, errors, slow_warning, slow_critical = analysis.excursion
    if index == 0:
        return policy.plan.errors_could_be_critical(trials, errors)
    return slow_could_be_critical(slow_warning, slow_critical, canary.slow_pending)


def judge(analysis: AnalysisState, evidence: Evidence, policy: Policy, weight: int) -> Verdict:
    """The full verdict with reasons and figures (built on demand, not every tick)."""
    level, confirmed = assess(analysis, evidence, policy, weight)
    gate = policy.compare_baseline and weight < 100
    figures = _figures(analysis, evidence, policy, gate)
    if level == "insufficient_data":
        reasons = [
            f"insufficient data: {evidence.canary.requests} of "
            f"{policy.analysis_min_requests} canary requests at this stage"
        ]
    else:
        reasons = _signal_reasons(analysis, evidence, policy, gate) or [_healthy_reason(evidence)]
    return Verdict(level=level, reasons=tuple(reasons), figures=figures, confirmed=confirmed)


def _signal_reasons(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, gate: bool
) -> list[str]:
    """One line per open signal, confirmed ones first, most severe first."""
    lines: list[tuple[int, str]] = []
    for index, name in enumerate(ABSOLUTE_TESTS):
        if not analysis.opened[index]:
            continue
        severity = _SEVERITY[index]
        test = policy.plan.absolute[index]
        text = (
            f"{_describe(index, evidence.canary, policy)} "
            f"(SPRT {analysis.scores[index]:.1f} >= {test.threshold:.1f})"
        )
        confirmed = not gate or analysis.compare_open(index)
        if gate and confirmed:
            text += f"; canary worse than baseline ({_baseline_rate(index, evidence.baseline)})"
        elif gate:
            text = _unconfirmed(index, text, evidence, _PAST[policy.action_for(severity)])
        if confirmed and severity == "warning" and warning_waits(index, analysis, evidence.canary, policy):
            text += "; held while the evidence still fits the critical level"
        lines.append((-(RANK[severity] + 3 * confirmed), text))
    return [text for _, text in sorted(lines, key=lambda line: line[0])]


def _unconfirmed(index: int, text: str, evidence: Evidence, acted: str) -> str:
    """An absolute signal the baseline comparison does not (yet) back."""
    column = (1, 1, 2, 3)[index]
    canary = _counts_rate(evidence.canary, column)
    baseline = _counts_rate(evidence.baseline, column)
    if baseline >= canary / 2:
        baseline_rate = _baseline_rate(index, evidence.baseline)
        return f"shared outage: {text} but baseline alike ({baseline_rate}) — not {acted}"
    return (
        f"{text}; not yet shown worse than the baseline "
        f"({_baseline_rate(index, evidence.baseline)}) — not {acted} yet"
    )


def _counts_rate(counts: StageCounts, column: int) -> float:
    bad = (counts.requests, counts.errors, counts.slow_warning, counts.slow_critical)[column]
    return _rate(bad, counts.requests)


def _describe(index: int, counts: StageCounts, policy: Policy) -> str:
    name = ABSOLUTE_TESTS[index]
    p0 = policy.plan.absolute[index].p0
    if index < 2:
        rate = _rate(counts.errors, counts.requests)
        return f"canary error rate {rate:.1%} ({counts.errors}/{counts.requests}) past {name} {p0:.0%}"
    slow = counts.slow_warning if index == 2 else counts.slow_critical
    limit = policy.p95_limit if index == 2 else policy.p99_limit
    return (
        f"canary requests over {limit:g}s {_rate(slow, counts.requests):.1%} "
        f"({slow}/{counts.requests}) past {name} ({p0:.0%} allowed)"
    )


def _baseline_rate(index: int, counts: StageCounts) -> str:
    bad = (counts.errors, counts.errors, counts.slow_warning, counts.slow_critical)[index]
    return f"baseline {_rate(bad, counts.requests):.1%} of {counts.requests}"


def _healthy_reason(evidence: Evidence) -> str:
    canary, baseline = evidence.canary, evidence.baseline
    return (
        f"healthy: canary error rate {_rate(canary.errors, canary.requests):.1%} "
        f"({canary.errors}/{canary.requests}), baseline "
        f"{_rate(baseline.errors, baseline.requests):.1%}; no threshold crossed"
    )


def _figures(analysis: AnalysisState, evidence: Evidence, policy: Policy, gate: bool) -> dict[str, Any]:
    tests: dict[str, Any] = {}
    for index, name in enumerate(ABSOLUTE_TESTS):
        test = policy.plan.absolute[index]
        tests[name] = {
            "score": round(analysis.scores[index], 3), "threshold": round(test.threshold, 3),
            "p0": test.p0, "p1": round(test.p1, 4), "open": analysis.opened[index],
            "gated_by": f"compare.{COMPARE_TESTS[COMPARE_OF[index]]}",
        }
    compare = policy.plan.compare
    for offset, name in enumerate(COMPARE_TESTS):
        tests[f"compare.{name}"] = {
            "score": round(analysis.scores[4 + offset], 3), "threshold": round(compare.threshold, 3),
            "ratio": compare.ratio, "open": analysis.opened[4 + offset],
        }
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
        },
    }


def _arm_figures(counts: StageCounts) -> dict[str, Any]:
    return {
        "requests": counts.requests,
        "errors": counts.errors,
        "error_rate": round(_rate(counts.errors, counts.requests), 5),
        "slow_warning": counts.slow_warning,
        "slow_critical": counts.slow_critical,
    }


def _difference(canary: StageCounts, baseline: StageCounts) -> dict[str, Any]:
    """Canary minus baseline error rate, with an Agresti-Caffo 95% interval and the
    (normal-approximation) confidence that the canary is worse."""
    pc = (canary.errors + 1) / (canary.requests + 2)
    pb = (baseline.errors + 1) / (baseline.requests + 2)
    adjusted = pc - pb
    se = sqrt(pc * (1 - pc) / (canary.requests + 2) + pb * (1 - pb) / (baseline.requests + 2))
    diff = _rate(canary.errors, canary.requests) - _rate(baseline.errors, baseline.requests)
    return {
        "error_rate_diff": round(diff, 5),
        "ci95": [round(adjusted - 1.96 * se, 5), round(adjusted + 1.96 * se, 5)],
        "confidence_worse": round(0.5 * (1 + erf(adjusted / se / sqrt(2))), 4),
    }


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
