"""Turn the tests' scores and the stage's confidence sequences into a verdict: a level,
reasons a person can act on, and the figures behind them (`rollout.figures`).

Levels: `insufficient_data` (below analysis.min_requests), `critical` / `warning` (a
signal open: a sequential test's alarm, or the stage's confidence sequence showing the
canary past a threshold), `ok` (no signal, and every judged rate shown below its
threshold: evidence of health, what promotion needs), `inconclusive` (neither yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rollout.evidence import StageCounts
from rollout.figures import figures, rate
from rollout.confidence import bounds
from rollout.health import StageHealth, rate_bounds, stage_health
from rollout.policy import Evidence, Policy
from rollout.sprt import ABSOLUTE_TESTS, AnalysisState, slow_could_be_critical
from rollout.state import Level, Severity

__all__ = ["RANK", "Severity", "Verdict", "assess", "judge", "regression_open", "regression_reason", "warning_waits"]

RANK: dict[str | None, int] = {
    None: 0, "ok": 0, "insufficient_data": 0, "inconclusive": 0, "warning": 1, "critical": 2,
}
_SEVERITY: tuple[Severity, ...] = ("warning", "critical", "warning", "critical")
_CRITICAL_OF = (1, 1, 3, 3)  # the critical test judging the same outcomes
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
        return {
            "level": self.level,
            "reasons": list(self.reasons),
            "tests": dict(self.figures.get("tests", {})),
            "evidence": dict(self.figures),
        }


def assess(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, weight: int
) -> tuple[Level, Severity | None]:
    """The verdict level, and the level confirmed for action: past the baseline gate, and
    for a warning, no longer possibly critical. Cheap: called every tick."""
    return _assess(analysis, evidence, policy, weight, stage_health(evidence.canary, policy))


def _assess(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, weight: int, health: StageHealth
) -> tuple[Level, Severity | None]:
    if evidence.canary.requests < policy.analysis_min_requests:
        return "insufficient_data", None
    gate = policy.compare_baseline and weight < 100
    level: Severity | None = None
    confirmed: Severity | None = None
    for index, severity in enumerate(_SEVERITY):
        if not (analysis.opened[index] or health.above[index]):
            continue
        if RANK[severity] > RANK[level]:
            level = severity
        if gate and not analysis.compare_open(index):
            continue
        if severity == "warning" and warning_waits(index, analysis, evidence.canary, policy, health):
            continue
        if RANK[severity] > RANK[confirmed]:
            confirmed = severity
    if regression_open(analysis, policy, weight):
        level = "critical" if level == "critical" else "warning"
        if not _regression_waits(evidence.canary, policy, health) and confirmed is None:
            confirmed = "warning"
    if level is None:
        return ("ok" if health.healthy else "inconclusive"), None
    return level, confirmed


def regression_open(analysis: AnalysisState, policy: Policy, weight: int) -> bool:
    """The latency regression signal (off at weight 100, where there is no baseline)."""
    return policy.plan.regression is not None and weight < 100 and analysis.regression.open


def _regression_waits(canary: StageCounts, policy: Policy, health: StageHealth) -> bool:
    """A regression warning waits while some canary request is past the p99 limit (or
    hanging past p95) and the p99 rate is not shown below 1%: maybe a critical canary."""
    if _ACTION_RANK[policy.on_critical] <= _ACTION_RANK[policy.on_warning]:
        return False
    return bool(canary.slow_critical + canary.slow_pending) and not health.below[3]


def warning_waits(
    index: int, analysis: AnalysisState, canary: StageCounts, policy: Policy, health: StageHealth
) -> bool:
    """A warning whose evidence still fits the critical level waits for the critical test
    (when that one acts more strongly), so a broken canary is rolled back, not stepped back.
    The sequential alarm asks its excursion; the stage's confidence sequence asks that the
    critical rate be shown below its threshold. Either one ready lets the warning act."""
    if _ACTION_RANK[policy.on_critical] <= _ACTION_RANK[policy.on_warning]:
        return False
    if health.above[index] and health.below[_CRITICAL_OF[index]]:
        return False
    if not analysis.opened[index]:
        return True
    trials, errors, slow_warning, slow_critical = analysis.excursion
    if index == 0:
        return policy.plan.errors_could_be_critical(trials, errors)
    return slow_could_be_critical(slow_warning, slow_critical, canary.slow_pending)


def judge(analysis: AnalysisState, evidence: Evidence, policy: Policy, weight: int) -> Verdict:
    """The full verdict with reasons and figures (built on demand, not every tick)."""
    health = stage_health(evidence.canary, policy)
    level, confirmed = _assess(analysis, evidence, policy, weight, health)
    gate = policy.compare_baseline and weight < 100
    if level == "insufficient_data":
        reasons = [
            f"insufficient data: {evidence.canary.requests} of "
            f"{policy.analysis_min_requests} canary requests at this stage"
        ]
    elif level == "ok":
        reasons = [_healthy_reason(evidence, policy)]
    elif level == "inconclusive":
        reasons = [_inconclusive_reason(evidence, policy, health)]
    else:
        reasons = _signal_reasons(analysis, evidence, policy, gate, health, weight)
    return Verdict(
        level=level, reasons=tuple(reasons), confirmed=confirmed,
        figures=figures(analysis, evidence, policy, health, gate, weight),
    )


def _signal_reasons(
    analysis: AnalysisState, evidence: Evidence, policy: Policy, gate: bool, health: StageHealth,
    gate_weight: int,
) -> list[str]:
    """One line per open signal, confirmed ones first, most severe first."""
    lines: list[tuple[int, str]] = []
    for index in range(len(ABSOLUTE_TESTS)):
        if not (analysis.opened[index] or health.above[index]):
            continue
        severity = _SEVERITY[index]
        text = f"{_describe(index, evidence.canary, policy)} ({_basis(index, analysis, policy, health)})"
        confirmed = not gate or analysis.compare_open(index)
        if gate and confirmed:
            text += f"; canary worse than baseline ({_baseline_rate(index, evidence.baseline)})"
        elif gate:
            text = _unconfirmed(index, text, evidence, _PAST[policy.action_for(severity)])
        if (
            confirmed and severity == "warning"
            and warning_waits(index, analysis, evidence.canary, policy, health)
        ):
            text += "; held while the evidence still fits the critical level"
        lines.append((-(RANK[severity] + 3 * confirmed), text))
    if regression_open(analysis, policy, gate_weight):
        text = regression_reason(analysis, evidence.canary, policy)
        if _regression_waits(evidence.canary, policy, health):
            text += "; held while some canary requests are past the p99 limit"
        lines.append((-4, text))
    return [text for _, text in sorted(lines, key=lambda line: line[0])]


def regression_reason(analysis: AnalysisState, canary: StageCounts, policy: Policy) -> str:
    """`canary latency regression: …` with the limit, the counts and both scores."""
    found, plan = analysis.regression, policy.plan.regression
    assert plan is not None
    judged, over, base_judged, base_over = found.judged
    interval = bounds(judged, over, policy.beta)
    ci = "" if interval is None else f", CI {interval.lower:.1%}–{interval.upper:.1%}"
    limit = f"{found.limit:.3g}s" if found.limit is not None else "-"
    p95 = f"{found.baseline_p95:.3g}s" if found.baseline_p95 is not None else "-"
    return (
        f"canary latency regression: {rate(over, judged):.1%} of canary requests ({over}/{judged}{ci}) "
        f"over {limit} = max({plan.p95_ratio:g} x baseline p95 {p95}, baseline p95 + {plan.min_delta * 1000:.0f}ms), "
        f"5% allowed; baseline {rate(base_over, base_judged):.1%} ({base_over}/{base_judged}) "
        f"(sequential scores {found.scores[0]:.1f} of {plan.rate.threshold:.1f} and "
        f"{found.scores[1]:.1f} of {plan.share.threshold:.1f} vs the baseline)"
    )


def _basis(index: int, analysis: AnalysisState, policy: Policy, health: StageHealth) -> str:
    """Which evidence holds the signal open, with its numbers as they are now."""
    parts = []
    if analysis.opened[index]:
        score, boundary = analysis.scores[index], policy.plan.absolute[index].threshold
        if score >= boundary:
            parts.append(f"sequential score {score:.1f}, boundary {boundary:.1f}")
        else:
            parts.append(
                f"sequential alarm open since its score reached {boundary:.1f}; now {score:.1f}, clears at 0"
            )
    if health.above[index]:
        parts.append(f"the whole stage shows it past the threshold at {1 - policy.beta:.0%} confidence")
    return "; ".join(parts)


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
    return rate(bad, counts.requests)


def _describe(index: int, counts: StageCounts, policy: Policy) -> str:
    """The judged rate with its counts and interval, against its threshold."""
    name = ABSOLUTE_TESTS[index]
    p0 = policy.plan.absolute[index].p0
    interval = _interval(counts, index, policy)
    if index < 2:
        return (
            f"canary error rate {rate(counts.errors, counts.requests):.1%} "
            f"({counts.errors}/{counts.requests}{interval}) past {name} {p0:.0%}"
        )
    slow = counts.slow_warning if index == 2 else counts.slow_critical
    limit = policy.p95_limit if index == 2 else policy.p99_limit
    return (
        f"canary requests over {limit:g}s {rate(slow, counts.requests):.1%} "
        f"({slow}/{counts.requests}{interval}) past {name} ({p0:.0%} allowed)"
    )


def _interval(counts: StageCounts, index: int, policy: Policy) -> str:
    found = rate_bounds(counts, index, policy)
    return "" if found is None else f", CI {found.lower:.1%}–{found.upper:.1%}"


def _baseline_rate(index: int, counts: StageCounts) -> str:
    bad = (counts.errors, counts.errors, counts.slow_warning, counts.slow_critical)[index]
    return f"baseline {rate(bad, counts.requests):.1%} of {counts.requests}"


_RATE_NAMES = ("error rate", "error rate", "over the p95 limit", "over the p99 limit")


def _rate_line(counts: StageCounts, index: int, policy: Policy) -> str:
    """`error rate 1.0% (≤ 3.1%) < errors.warning 5%`: estimate, upper bound, threshold."""
    found = rate_bounds(counts, index, policy)
    p0 = policy.plan.absolute[index].p0
    name = ABSOLUTE_TESTS[index]
    if found is None:
        return f"{_RATE_NAMES[index]} - vs {name} {p0:.0%}"
    return f"{_RATE_NAMES[index]} {found.estimate:.1%} (upper bound {found.upper:.2%}) vs {name} {p0:.0%}"


def _healthy_reason(evidence: Evidence, policy: Policy) -> str:
    canary, baseline = evidence.canary, evidence.baseline
    shown = "; ".join(_rate_line(canary, index, policy) for index in (0, 2, 3))
    return (
        f"healthy: every rate shown below its threshold at {1 - policy.beta:.0%} confidence "
        f"over {canary.requests} canary requests — {shown}; baseline error rate "
        f"{rate(baseline.errors, baseline.requests):.1%}"
    )


def _inconclusive_reason(evidence: Evidence, policy: Policy, health: StageHealth) -> str:
    pending = [index for index in range(len(ABSOLUTE_TESTS)) if not health.below[index]]
    if 0 in pending and 1 in pending:
        pending.remove(1)  # the same error rate, the lower threshold says it all
    shown = "; ".join(_rate_line(evidence.canary, index, policy) for index in pending)
    return (
        f"inconclusive: not yet shown below every threshold after {evidence.canary.requests} "
        f"canary requests — {shown}; promotion waits"
    )
