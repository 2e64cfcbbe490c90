"""Render the admin listener's /status JSON as the readable `canary status` summary."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

__all__ = ["format_duration", "format_status", "format_summary"]

_ARMS = ("baseline", "canary")
_LAST_TRANSITIONS = 8


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def _clock(iso: str) -> str:
    """An ISO 8601 time as local YYYY-MM-DD HH:MM:SS (the JSON keeps full precision)."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return str(iso)


def format_summary(status: Mapping[str, Any]) -> str:
    """One line after a control command: where the rollout stands now."""
    stage = _stage_text(status)
    return f"state {status['state']}, weight {status['weight']}%{stage}: {status.get('reason') or '-'}"


def _stage_text(status: Mapping[str, Any]) -> str:
    stages = status.get("stages") or []
    if status.get("stage"):
        return f" (stage {status['stage']} of {len(stages)})"
    return " (not a plan stage)" if status.get("weight") else ""


def format_status(status: Mapping[str, Any], *, admin_url: str = "") -> str:
    sections = [
        _header(status, admin_url),
        _config(status.get("config") or {}),
        _workers(status.get("workers") or []),
        _arms(status.get("arms") or {}),
        _verdict(status.get("verdict") or {}),
        _history(status.get("history") or []),
    ]
    return "\n\n".join(section for section in sections if section)


def _header(status: Mapping[str, Any], admin_url: str) -> str:
    stages = status.get("stages") or []
    plan = " → ".join(f"[{s}]" if s == status["weight"] else str(s) for s in stages)
    bake = status.get("bake") or {}
    lines = [
        f"canary-proxy {admin_url}".rstrip(),
        f"state    {status['state'].upper()}   weight {status['weight']}%{_stage_text(status)}",
        f"plan     {plan}",
        f"bake     {format_duration(bake.get('elapsed'))} of {format_duration(bake.get('required'))} at this weight",
        f"reason   {status.get('reason') or '-'}",
    ]
    shadow = status.get("shadow") or {}
    if shadow.get("duration") or shadow.get("mirrored"):
        dropped = sum((shadow.get("dropped") or {}).values())
        when = "mirroring now" if shadow.get("active") else f"{format_duration(shadow.get('duration'))} before stage 1"
        lines.append(f"shadow   {shadow.get('mirrored', 0)} copies mirrored, {dropped} dropped ({when})")
    store_error = (status.get("store") or {}).get("error")
    if store_error:
        lines.append(f"STATE STORE PROBLEM: {store_error}")
    return "\n".join(lines)


def _config(config: Mapping[str, Any]) -> str:
    lines = [f"config   {config.get('path') or '-'} (loaded {_clock(config.get('loaded_at', ''))})"]
    if config.get("error"):
        lines.append("  REJECTED EDIT — still serving the last good config:")
        lines.extend(f"    {line}" for line in str(config["error"]).splitlines())
    return "\n".join(lines)


def _workers(workers: list[Mapping[str, Any]]) -> str:
    """`workers: N` > 1: one line per worker process (absent with one process)."""
    if not workers:
        return ""
    lines = [f"workers  {len(workers)} processes (requests since each started)"]
    for worker in workers:
        restarts = worker.get("restarts", 0)
        state = "serving" if worker.get("alive") else "STARTING AGAIN"
        lines.append(
            f"  {worker['slot']}: pid {worker.get('pid') or '-'}, {state}, {worker.get('requests', 0)} requests"
            + (f", restarted {restarts}×" if restarts else "")
        )
    return "\n".join(lines)


def _arms(arms: Mapping[str, Any]) -> str:
    header = f"{'':10}{'requests':>10}{'errors':>8}{'error rate':>12}{'p50':>10}{'p95':>10}{'p99':>10}{'in flight':>11}"
    rows = [header]
    for arm in _ARMS:
        figures = arms.get(arm)
        if not figures:
            continue
        rows.append(
            f"{arm:10}{figures['requests']:>10}{figures['errors']:>8}{_percent(figures['error_rate']):>12}"
            f"{format_duration(figures['p50']):>10}{format_duration(figures['p95']):>10}"
            f"{format_duration(figures['p99']):>10}{figures.get('inflight', 0):>11}"
        )
    rows.append("(requests, errors and latency over the analysis window)")
    return "\n".join(rows)


def _verdict(verdict: Mapping[str, Any]) -> str:
    level = str(verdict.get("level", "-"))
    lines = [f"verdict  {level.upper().replace('_', ' ')}"]
    lines.extend(f"  - {reason}" for reason in verdict.get("reasons") or [])
    evidence = verdict.get("evidence") or {}
    if evidence:
        lines.append("evidence since this weight was set")
        lines.extend(_evidence(evidence))
    return "\n".join(lines)


def _evidence(evidence: Mapping[str, Any]) -> list[str]:
    lines = []
    for arm in _ARMS:
        figures = evidence.get(arm)
        if figures:
            lines.append(
                f"  {arm:9}{figures['requests']:>7} requests {figures['errors']:>5} errors "
                f"({_percent(figures['error_rate'])}), {figures.get('slow_warning', 0)} over the p95 limit, "
                f"{figures.get('slow_critical', 0)} over the p99 limit"
            )
    lines.extend(_comparison(evidence.get("comparison") or {}))
    tests = evidence.get("tests") or {}
    if tests:
        lines.append(f"  {'test':24}{'stage estimate':>15}  {'anytime CI':<20}{'limit':>8}  {'score/boundary':<16}")
        lines.extend(_test_row(name, test) for name, test in tests.items())
        lines.append(
            "  (intervals hold however often they are looked at; compare.*: the canary's share of "
            "the bad outcomes, its limit its share of the requests)"
        )
    thresholds = evidence.get("thresholds") or {}
    if thresholds:
        lines.append("  thresholds: " + ", ".join(f"{key} {value:g}" for key, value in thresholds.items()))
    return lines


def _comparison(comparison: Mapping[str, Any]) -> list[str]:
    if "error_rate_diff" not in comparison:
        return []
    text = f"  canary − baseline error rate {comparison['error_rate_diff'] * 100:+.2f}%"
    if comparison.get("ci95"):
        low, high = comparison["ci95"]
        text += (
            f" (95% CI {_percent(low)} .. {_percent(high)}), confidence the canary is worse "
            f"{(comparison.get('confidence_worse') or 0) * 100:.0f}%"
        )
    else:
        text += " (no interval: an arm has no requests at this stage)"
    return [text + ("" if comparison.get("required") else " (comparison not required)")]


def _test_row(name: str, test: Mapping[str, Any]) -> str:
    """One test: the stage estimate and its anytime-valid interval beside the score."""
    ci = test.get("ci")
    interval = f"{_percent(ci[0])} .. {_percent(ci[1])}" if ci else "-"
    limit = test.get("limit", test.get("expected"))
    marks = [mark for key, mark in (("open", "OPEN"), ("below", "shown below"), ("above", "shown above")) if test.get(key)]
    return (
        f"  {name:24}{_percent(test.get('estimate')):>15}  {interval:<20}{_percent(limit):>8}  "
        f"{test.get('score', 0):.1f}/{test.get('threshold', 0):.1f}".ljust(90) + " ".join(marks)
    ).rstrip()


def _decision_figures(evidence: Mapping[str, Any]) -> str:
    """The figures an automatic decision was taken on, one line under it in the history."""
    parts = []
    for name, test in (evidence.get("tests") or {}).items():
        if name.startswith("compare.") or test.get("estimate") is None:
            continue
        ci = test.get("ci") or (None, None)
        parts.append(
            f"{name} {_percent(test['estimate'])} [{_percent(ci[0])}..{_percent(ci[1])}] "
            f"score {test.get('score', 0):.1f}/{test.get('threshold', 0):.1f}"
        )
    return "; ".join(parts)


def _history(history: list[Mapping[str, Any]]) -> str:
    if not history:
        return "last transitions: none"
    lines = ["last transitions (newest last)"]
    for item in history[-_LAST_TRANSITIONS:]:
        lines.append(
            f"  {_clock(item['at'])}  {item['action']:<10} {item['trigger']:<8} "
            f"{item['from_weight']:>3}% → {item['weight']:>3}%  {item['state']:<12} {item.get('reason', '')}"
        )
        figures = _decision_figures(item.get("evidence") or {}) if item.get("trigger") == "auto" else ""
        if figures:
            lines.append(f"{'':23}figures: {figures}")
    return "\n".join(lines)
