"""What `canary demo` prints: the live progress line, transition lines and the summary.

Pure formatting of the controller's status and history (CONTRACT §6 shapes) and the
traffic generator's tally; no I/O here, so the wording is easy to test and change.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.demo.traffic import TrafficTally
from rollout.state import from_iso

__all__ = ["PROGRESS_LEGEND", "DemoOutcome", "Protection", "is_finished", "progress_line", "summary", "transition_line"]

Status = Mapping[str, Any]
_INDENT = " " * 12
_AUTO_HOLD = ("step_back", "pause")


@dataclass(frozen=True, kw_only=True)
class Protection:
    """With `--protect`: what the clients saw against what the canary did."""

    client_errors: int  # failed calls the traffic generator saw, on either arm
    canary_errors: int  # errors recorded against the canary (live calls and shadow copies)
    fallbacks: int  # canary calls answered by the baseline instead
    mirrored: int  # shadow copies sent to the canary
    dropped: int  # shadow copies not sent (queue full)


@dataclass(frozen=True, kw_only=True)
class DemoOutcome:
    """Everything the summary needs, taken once the story has ended."""

    status: Status
    history: Sequence[Mapping[str, Any]]
    tally: TrafficTally
    users: int
    started_at: float  # epoch seconds, when the proxy started
    ended_at: float
    finished: bool  # False: stopped by the time limit
    config_path: Path
    state_path: Path
    log_path: Path
    protection: Protection | None = None


def is_finished(status: Status) -> bool:
    """The story is over: promoted, rolled back, or held by an automatic step back/pause."""
    return status["state"] in ("promoted", "rolled_back") or (
        status["state"] == "paused" and status.get("latched") is not None
    )


# -- live progress ---------------------------------------------------------------------------


PROGRESS_LEGEND = "time  weight (stage) state | each arm over the analysis window: requests, error rate, p95 | verdict"


def progress_line(status: Status, elapsed: float, min_requests: int) -> str:
    """One line of live progress; `PROGRESS_LEGEND` names its columns. `min_requests` is
    rollout.min_requests, shown beside the bake while a healthy stage waits for promotion."""
    stage, stages = status["stage"], status["stages"]
    where = f"({stage}/{len(stages)})" if stage else f"(-/{len(stages)})"
    parts = [f"{elapsed:6.1f}s {status['weight']:>3}% {where} {status['state']:<11}"]
    for arm in ("baseline", "canary"):
        figures = status["arms"][arm]
        parts.append(
            f"{arm} {figures['requests']:>5} {figures['error_rate']:5.1%} {_seconds(figures['p95'])}"
        )
    parts.append(_verdict_brief(status, min_requests))
    return " | ".join(parts)


def _verdict_brief(status: Status, min_requests: int) -> str:
    verdict = status["verdict"]
    level = verdict["level"]
    if level == "insufficient_data":
        evidence = verdict.get("evidence", {})
        needed = evidence.get("thresholds", {}).get("analysis.min_requests", "?")
        have = evidence.get("canary", {}).get("requests", 0)
        return f"waiting for data ({have}/{needed})"
    text = level
    if level == "ok" and status["state"] in ("progressing", "shadow"):
        bake = status.get("bake", {})
        requests = status["arms"]["canary"]["stage"]["requests"]
        text += f", bake {bake.get('elapsed', 0):.1f}/{bake.get('required', 0):g}s, {requests}/{min_requests} req"
    return text


def transition_line(transition: Mapping[str, Any], started_at: float) -> str:
    at = from_iso(transition["at"]) - started_at
    arrow = f"{transition['from_weight']}% -> {transition['weight']}%"
    return (
        f"{max(0.0, at):6.1f}s {transition['action'].upper()} {arrow} ({transition['trigger']}, "
        f"now {transition['state']}): {transition['reason']}"
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "   -  "
    return f"{value * 1000:4.0f}ms" if value < 1 else f"{value:5.2f}s"


# -- the summary -------------------------------------------------------------------------------


def summary(outcome: DemoOutcome, width: int = 100) -> str:
    width = max(60, min(width, 120))
    lines = ["", "=" * width, *_headline(outcome, width)]
    decisive = _decisive(outcome)
    if decisive is not None:
        lines += _wrapped("Why:" if outcome.finished else "Last step:", decisive["reason"], width)
        lines += _figures(decisive.get("evidence", {}))
    if not outcome.finished:  # still waiting: what the stage's evidence says now
        verdict = outcome.status.get("verdict", {})
        level = str(verdict.get("level", "-"))
        for reason in verdict.get("reasons", [])[:2]:
            lines += _wrapped("Verdict:", reason if reason.startswith(level) else f"{level}: {reason}", width)
        lines += _figures({**verdict.get("evidence", {}), "window": outcome.status.get("arms", {})})
    lines += _thresholds(outcome.status)
    lines += _stages(outcome)
    lines += _traffic(outcome)
    lines += _protected(outcome.protection, width)
    lines += [
        f"Files:      config {outcome.config_path}",
        f"{_INDENT}state  {outcome.state_path}",
        f"{_INDENT}logs   {outcome.log_path} (JSON lines; each decision is a rollout_transition event)",
        f"Took {outcome.ended_at - outcome.started_at:.1f}s.",
        "=" * width,
    ]
    return "\n".join(lines)


def _headline(outcome: DemoOutcome, width: int) -> list[str]:
    status = outcome.status
    state, weight = status["state"], status["weight"]
    if state == "promoted":
        text = f"PROMOTED: the canary (new async path) serves {weight}% of traffic."
    elif state == "rolled_back":
        text = f"ROLLED BACK: the canary serves {weight}% of traffic; the baseline serves all of it."
    elif state == "paused" and status.get("latched"):
        text = f"STEPPED BACK and paused at {weight}% (a {status['latched']} signal); `canary resume` would go on."
    else:
        text = f"NOT FINISHED in time: state {state} at weight {weight}%."
    return _wrapped("Result:", text, width)


def _decisive(outcome: DemoOutcome) -> Mapping[str, Any] | None:
    """The transition that ended the story, or the last one when it has not ended."""
    if not outcome.history:
        return None
    last = outcome.history[-1]
    if outcome.status["state"] == "promoted" or not outcome.finished:
        return last
    for transition in reversed(outcome.history):
        if transition["action"] == "rollback" or transition["action"] in _AUTO_HOLD:
            return transition
    return last


def _figures(evidence: Mapping[str, Any]) -> list[str]:
    if "canary" not in evidence:
        return []
    window, thresholds = evidence.get("window", {}), evidence.get("thresholds", {})
    lines: list[str] = []
    for arm in ("canary", "baseline"):
        figures = evidence[arm]
        if not figures["requests"]:
            continue
        slow = ", ".join(
            f"{figures.get(key, 0)} over {thresholds[limit]:g}s"
            for key, limit in (("slow_warning", "latency.p95_warning"), ("slow_critical", "latency.p99_critical"))
            if limit in thresholds
        )
        p95 = window.get(arm, {}).get("p95")
        lines.append(
            f"{'' if lines else 'Measured:':<12}{arm:<8} {figures['requests']:>6} requests at this stage, "
            f"{figures['errors']} errors ({figures['error_rate']:.1%}), {slow}; "
            f"window p95 {_seconds(p95).strip() if p95 is not None else 'n/a (none finished)'}"
        )
    return lines + _comparison(evidence)


def _comparison(evidence: Mapping[str, Any]) -> list[str]:
    comparison = evidence.get("comparison")
    canary, baseline = evidence["canary"], evidence["baseline"]
    if not comparison or not comparison.get("ci95") or not (canary["errors"] or baseline["errors"]):
        return []
    low, high = comparison["ci95"]
    return [
        f"{_INDENT}canary - baseline error rate {comparison['error_rate_diff']:+.1%} "
        f"(95% CI {low:+.1%} .. {high:+.1%}), confidence the canary is worse "
        f"{comparison['confidence_worse']:.1%}"
    ]


def _thresholds(status: Status) -> list[str]:
    thresholds = status["verdict"].get("evidence", {}).get("thresholds")
    if not thresholds:
        return []
    return [
        f"Thresholds: errors warning {thresholds['errors.warning']:.0%} / critical "
        f"{thresholds['errors.critical']:.0%}; requests over {thresholds['latency.p95_warning']:g}s "
        f"> 5% (p95) / over {thresholds['latency.p99_critical']:g}s > 1% (p99); "
        f"no verdict below {thresholds['analysis.min_requests']} canary requests"
    ]


def _stages(outcome: DemoOutcome) -> list[str]:
    """How long each weight was held, and how it ended, from the history."""
    history = outcome.history
    lines: list[str] = []
    for index, transition in enumerate(history):
        following = history[index + 1] if index + 1 < len(history) else None
        if transition["state"] in ("promoted", "rolled_back") or (outcome.finished and following is None):
            continue  # the state the story ended in
        end = from_iso(following["at"]) if following else outcome.ended_at
        then = _how_it_ended(following)
        label = "Stages:" if not lines else ""
        where = "shadow" if transition["state"] == "shadow" else f"{transition['weight']:>3}%"
        lines.append(f"{label:<12}{where} for {end - from_iso(transition['at']):5.1f}s, {then}")
    return lines


def _how_it_ended(following: Mapping[str, Any] | None) -> str:
    if following is None:
        return "until the time limit"
    action, weight = following["action"], following["weight"]
    if action == "promote":
        return "then the rollout completed" if following["state"] == "promoted" else f"then promoted to {weight}%"
    if action == "rollback":
        return "then rolled back to 0%"
    if action == "step_back":
        return f"then stepped back to {weight}%"
    return f"then {action} ({following['trigger']}) at {weight}%"


def _traffic(outcome: DemoOutcome) -> list[str]:
    tally = outcome.tally
    served = ", ".join(
        f"{arm} {figures.requests:,} ({figures.errors:,} failed)"
        for arm, figures in tally.arms.items()
        if figures.requests or arm in ("baseline", "canary")
    )
    streamed = sum(figures.streamed for figures in tally.arms.values())
    return [
        f"Traffic:    {tally.requests:,} calls from {len(tally.users_seen)} of {outcome.users} users "
        f"({streamed:,} streamed); served by {served}"
    ]


def _protected(protection: Protection | None, width: int) -> list[str]:
    if protection is None:
        return []
    text = (
        f"errors seen by clients {protection.client_errors:,} vs errors the canary made "
        f"{protection.canary_errors:,} ({protection.mirrored:,} shadow copies sent, "
        f"{protection.dropped:,} dropped; {protection.fallbacks:,} live canary calls answered by the baseline)"
    )
    return _wrapped("Protected:", text, width)


def _wrapped(label: str, text: str, width: int) -> list[str]:
    return textwrap.wrap(
        text, width=width, initial_indent=f"{label:<12}", subsequent_indent=_INDENT, break_on_hyphens=False
    ) or [label]
