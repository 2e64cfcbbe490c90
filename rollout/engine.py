"""The pure rollout core: (state, evidence, policy, now) -> (new state, decision).

No I/O, no clock reads, no randomness: the controller passes the time and the counts in
and applies what comes out, so every rule here is testable with plain tables. The
operator commands are pure functions of the same shape. Semantics: CONTRACT §2 and §5.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from config.settings import Action
from rollout.evidence import StageCounts
from rollout.policy import Evidence, Policy
from rollout.sprt import AnalysisState, advance
from rollout.state import Level, RolloutState, Severity, State, Transition, Trigger
from rollout.verdict import RANK, Verdict, assess, judge

__all__ = [
    "Decision",
    "Evidence",
    "Policy",
    "apply_config",
    "decide",
    "initial_state",
    "pause",
    "promote",
    "promotion_due",
    "reload",
    "reset",
    "resume",
    "rollback",
    "set_weight",
]

Step = tuple[RolloutState, "Decision | None"]
_SHADOW_TEXT = "shadow at 0%: copies of requests go to the canary, every client gets the baseline"
Figures = Mapping[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class Decision:
    """A transition to record; `new_stage` means the stage evidence restarts."""

    transition: Transition
    new_stage: bool


def decide(
    state: RolloutState, analysis: AnalysisState, evidence: Evidence, policy: Policy, now: float
) -> tuple[RolloutState, AnalysisState, Decision | None]:
    """One tick: feed the tests, then take at most one automatic step."""
    latency = (evidence.canary.latency_bins, evidence.baseline.latency_bins)
    analysis = advance(analysis, _counts(evidence.canary), _counts(evidence.baseline), policy.plan, latency)
    level, confirmed = assess(analysis, evidence, policy, state.weight)
    target = _automatic_target(state, confirmed, policy)
    if target is not None:
        verdict = judge(analysis, evidence, policy, state.weight)
        new, decision = _act(state, target, verdict, now)
    elif promotion_due(state, level, evidence, policy, now):
        verdict = judge(analysis, evidence, policy, state.weight)
        reason = f"{_healthy_for(state, evidence, now)} ({verdict.reasons[0]})"
        new, decision = _promote(state, policy, now, "auto", reason, verdict.figures)
    else:
        return state, analysis, None
    return new, AnalysisState() if decision.new_stage else analysis, decision


def _healthy_for(state: RolloutState, evidence: Evidence, now: float) -> str:
    elapsed = now - state.stage_started_at
    if state.state == "shadow":
        return f"shadow healthy for {elapsed:.0f}s with {evidence.canary.requests} mirrored canary requests"
    return f"stage at {state.weight}% healthy for {elapsed:.0f}s with {evidence.canary.requests} canary requests"


def _counts(counts: StageCounts) -> tuple[int, int, int, int]:
    return counts.requests, counts.errors, counts.slow_warning, counts.slow_critical


def _automatic_target(
    state: RolloutState, confirmed: Severity | None, policy: Policy
) -> tuple[Severity, Action, State, int] | None:
    """What an open, confirmed signal asks for; None when it is latched or a no-op."""
    if confirmed is None or state.state == "rolled_back":
        return None
    if RANK[confirmed] <= RANK[state.latched]:
        return None
    action = policy.action_for(confirmed)
    if state.state == "shadow" and action != "rollback":
        return None  # no user sees the canary yet: a shadow that is not healthy just waits
    if action == "rollback":
        to_state, weight = "rolled_back", 0
    elif action == "step_back":
        to_state, weight = "paused", policy.previous_stage(state.weight)
    else:
        to_state, weight = "paused", state.weight
    if (to_state, weight) == (state.state, state.weight):
        return None
    return confirmed, action, to_state, weight  # type: ignore[return-value]


def _act(
    state: RolloutState, target: tuple[Severity, Action, State, int], verdict: Verdict, now: float
) -> tuple[RolloutState, Decision]:
    severity, action, to_state, weight = target
    reason = f"{severity}: {verdict.reasons[0]}" if verdict.reasons else severity
    return _move(
        state, action=action, trigger="auto", to_state=to_state, weight=weight, now=now,
        reason=reason, evidence=verdict.figures, latched=severity,
    )


def promotion_due(state: RolloutState, level: Level, evidence: Evidence, policy: Policy, now: float) -> bool:
    """The one promotion rule: state `progressing` (or `shadow`), auto_promote on, `bake`
    (in shadow: `rollout.shadow`) and `rollout.min_requests` met at the stage, and a healthy
    verdict (`ok`: every judged rate shown below its threshold, no signal open)."""
    return (
        state.state in ("progressing", "shadow")
        and policy.auto_promote
        and level == "ok"
        and now - state.stage_started_at >= policy.bake_for(state.state)
        and evidence.canary.requests >= policy.min_requests
    )


def _move(
    state: RolloutState,
    *,
    action: str,
    trigger: Trigger,
    to_state: State,
    weight: int,
    now: float,
    reason: str,
    evidence: Figures = None,
    latched: Severity | None = None,
    new_stage: bool | None = None,
    config_weight: int | None | Literal["keep"] = "keep",
) -> tuple[RolloutState, Decision]:
    """Build the next state and the transition that records the move."""
    if new_stage is None:
        new_stage = weight != state.weight
    new = replace(
        state,
        state=to_state,
        weight=weight,
        reason=reason,
        latched=latched,
        stage_started_at=now if new_stage else state.stage_started_at,
        config_weight=state.config_weight if config_weight == "keep" else config_weight,
    )
    transition = Transition(
        at=now, action=action, trigger=trigger, from_state=state.state, state=to_state,
        from_weight=state.weight, weight=weight, reason=reason, evidence=dict(evidence or {}),
    )
    return new, Decision(transition=transition, new_stage=new_stage)


def _promote(
    state: RolloutState, policy: Policy, now: float, trigger: Trigger, reason: str, evidence: Figures
) -> tuple[RolloutState, Decision]:
    following = policy.next_stage(state.weight)
    if following is None:
        return _move(
            state, action="promote", trigger=trigger, to_state="promoted", weight=state.weight,
            now=now, reason=f"{reason}: rollout complete at {state.weight}%", evidence=evidence,
        )
    return _move(
        state, action="promote", trigger=trigger, to_state="progressing", weight=following,
        now=now, reason=f"{reason}: promote to {following}%", evidence=evidence,
    )


# -- first start, operator commands, config changes ----------------------------------------


def initial_state(
    policy: Policy, config_weight: int | None, now: float
) -> tuple[RolloutState, Decision]:
    """No state stored yet: the first stage, or the weight pinned in the config."""
    blank = RolloutState(state="progressing", weight=0, stage_started_at=now)
    if config_weight is not None:
        return _move(
            blank, action="start", trigger="config", to_state="manual", weight=config_weight,
            now=now, reason=f"first start: rollout.weight pins {config_weight}%",
            new_stage=True, config_weight=config_weight,
        )
    if policy.shadow > 0:
        return _move(
            blank, action="start", trigger="config", to_state="shadow", weight=0, now=now,
            reason=f"first start: {_SHADOW_TEXT}", new_stage=True,
        )
    first = policy.stages[0]
    return _move(
        blank, action="start", trigger="config", to_state="progressing", weight=first, now=now,
        reason=f"first start: stage 1 at {first}%", new_stage=True,
    )


def promote(
    state: RolloutState, policy: Policy, now: float, *,
    reason: str = "", trigger: Trigger = "operator", evidence: Figures = None,
) -> Step:
    """Next stage now, skipping the bake; after the last stage, `promoted`."""
    if state.state == "promoted":
        return state, None
    return _promote(state, policy, now, trigger, reason or f"{trigger} promote", evidence)


def pause(
    state: RolloutState, policy: Policy, now: float, *,
    reason: str = "", trigger: Trigger = "operator", evidence: Figures = None,
) -> Step:
    """Hold automatic promotion at the current weight; analysis and rollback go on."""
    if state.state in ("paused", "rolled_back"):
        return state, None
    return _move(
        state, action="pause", trigger=trigger, to_state="paused", weight=state.weight, now=now,
        reason=reason or f"{trigger} pause", evidence=evidence,
    )


def resume(
    state: RolloutState, policy: Policy, now: float, *,
    reason: str = "", trigger: Trigger = "operator", evidence: Figures = None,
) -> Step:
    """Continue the plan from the current weight with a fresh bake; after a rollback (or
    at 0, where no evidence can accrue) restart at the first stage — at 0 with a shadow
    configured, in shadow again."""
    if state.state in ("shadow", "progressing", "promoted"):
        return state, None
    if state.state != "rolled_back" and not state.weight and policy.shadow > 0:
        return _move(
            state, action="resume", trigger=trigger, to_state="shadow", weight=0, now=now,
            reason=reason or f"{trigger} resume: {_SHADOW_TEXT}", evidence=evidence, new_stage=True,
        )
    weight = state.weight if state.state != "rolled_back" and state.weight else policy.stages[0]
    return _move(
        state, action="resume", trigger=trigger, to_state="progressing", weight=weight, now=now,
        reason=reason or f"{trigger} resume at {weight}%", evidence=evidence, new_stage=True,
    )


def rollback(
    state: RolloutState, policy: Policy, now: float, *,
    reason: str = "", trigger: Trigger = "operator", evidence: Figures = None,
) -> Step:
    """Weight 0 at once; only resume or reset (or another explicit command) leaves it."""
    if state.state == "rolled_back":
        return state, None
    return _move(
        state, action="rollback", trigger=trigger, to_state="rolled_back", weight=0, now=now,
        reason=reason or f"{trigger} rollback", evidence=evidence,
    )


def reset(
    state: RolloutState, policy: Policy, now: float, *,
    reason: str = "", trigger: Trigger = "operator", evidence: Figures = None,
) -> Step:
    """Start the plan again from the first stage (from shadow, when one is configured)."""
    if policy.shadow > 0:
        return _move(
            state, action="reset", trigger=trigger, to_state="shadow", weight=0, now=now,
            reason=reason or f"{trigger} reset: {_SHADOW_TEXT}", evidence=evidence, new_stage=True,
        )
    first = policy.stages[0]
    return _move(
        state, action="reset", trigger=trigger, to_state="progressing", weight=first, now=now,
        reason=reason or f"{trigger} reset to {first}%", evidence=evidence, new_stage=True,
    )


def set_weight(
    state: RolloutState, policy: Policy, now: float, percent: int, *,
    reason: str = "", trigger: Trigger = "operator", evidence: Figures = None,
) -> Step:
    """Pin the weight by hand (state `manual`); automatic rollback still applies."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"weight must be a whole percent 0..100, got {percent!r}")
    if (state.state, state.weight) == ("manual", percent) and trigger != "config":
        return state, None
    return _move(
        state, action="set_weight", trigger=trigger, to_state="manual", weight=percent, now=now,
        reason=reason or f"{trigger} set weight to {percent}%", evidence=evidence,
        config_weight=percent if trigger == "config" else "keep",
    )


def reload(state: RolloutState, now: float, *, reason: str) -> Step:
    """A config reload that moved nothing: recorded in the history, state and latch kept."""
    return _move(
        state, action="reload", trigger="config", to_state=state.state, weight=state.weight,
        now=now, reason=reason, latched=state.latched, new_stage=False,
    )


def apply_config(state: RolloutState, policy: Policy, config_weight: int | None, now: float) -> Step:
    """A (re)loaded config: a new `rollout.weight` pins it like set-weight; removing it
    from a manual rollout resumes the plan; an unchanged one never undoes anything."""
    if config_weight == state.config_weight:
        return state, None
    if config_weight is not None:
        reason = f"config rollout.weight changed to {config_weight}%"
        return set_weight(state, policy, now, config_weight, reason=reason, trigger="config")
    reason = "config rollout.weight removed"
    if state.state == "manual":
        new, decision = resume(
            state, policy, now, reason=f"{reason}: resume the plan", trigger="config"
        )
    else:
        new, decision = _move(
            state, action="reload", trigger="config", to_state=state.state, weight=state.weight,
            now=now, reason=f"{reason}: nothing pinned, {state.state} kept", latched=state.latched,
        )
    return replace(new, config_weight=None), decision
