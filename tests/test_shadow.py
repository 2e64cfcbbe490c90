"""The shadow stage (CONTRACT §8) in the pure rollout core and the config: where a first
start and a reset begin, what ends the shadow, what the operator commands do from it."""

from __future__ import annotations

from dataclasses import replace

from rollout import engine
from rollout.engine import Evidence, Policy, decide
from rollout.evidence import StageCounts
from rollout.state import RolloutState
from tests.test_engine import signals

POLICY = Policy(stages=(5, 25, 50, 100), bake=60.0, shadow=30.0, min_requests=10, analysis_min_requests=5)
T0 = 1_700_000_000.0
SHADOW = RolloutState(state="shadow", weight=0, stage_started_at=T0)
HEALTHY = signals(canary=(2000, 0), baseline=(2000, 0))


def test_a_first_start_with_a_shadow_begins_in_shadow_at_weight_0():
    state, decision = engine.initial_state(POLICY, None, T0)
    assert (state.state, state.weight) == ("shadow", 0)
    assert decision.transition.action == "start" and "shadow" in decision.transition.reason
    without = engine.initial_state(replace(POLICY, shadow=0.0), None, T0)[0]
    assert (without.state, without.weight) == ("progressing", 5)
    pinned = engine.initial_state(POLICY, 30, T0)[0]
    assert (pinned.state, pinned.weight) == ("manual", 30)  # a pinned weight wins


def test_a_healthy_shadow_goes_to_the_first_stage_after_its_own_duration():
    analysis, evidence = HEALTHY
    assert decide(SHADOW, analysis, evidence, POLICY, T0 + 29)[2] is None  # shadow lasts 30 s
    state, _, decision = decide(SHADOW, analysis, evidence, POLICY, T0 + 31)  # not the 60 s bake
    assert (state.state, state.weight) == ("progressing", 5)
    assert decision.transition.action == "promote" and decision.new_stage
    assert decision.transition.reason.startswith("shadow healthy for 31s with 2000 mirrored canary requests")


def test_a_shadow_waits_for_min_requests_mirrored():
    analysis, _ = HEALTHY
    few = Evidence(canary=StageCounts(requests=9), baseline=StageCounts(requests=2000))
    assert decide(SHADOW, analysis, few, POLICY, T0 + 31)[2] is None


def test_a_critical_shadow_is_rolled_back_and_a_warning_one_waits():
    critical = signals("errors.warning", "errors.critical", "compare.errors", canary=(200, 60))
    state, _, decision = decide(SHADOW, *critical, POLICY, T0 + 31)
    assert (state.state, state.weight, decision.transition.action) == ("rolled_back", 0, "rollback")
    warning = signals("errors.warning", "compare.errors", canary=(400, 34))
    assert decide(SHADOW, *warning, POLICY, T0 + 31)[2] is None  # no user sees it: it waits


def test_operator_commands_from_shadow():
    promoted = engine.promote(SHADOW, POLICY, T0 + 1)[0]
    assert (promoted.state, promoted.weight) == ("progressing", 5)
    assert engine.resume(SHADOW, POLICY, T0 + 1) == (SHADOW, None)
    paused = engine.pause(SHADOW, POLICY, T0 + 1)[0]
    assert (paused.state, paused.weight) == ("paused", 0)
    resumed = engine.resume(paused, POLICY, T0 + 2)[0]
    assert (resumed.state, resumed.weight) == ("shadow", 0)  # at 0, the plan starts with the shadow
    rolled_back = engine.rollback(SHADOW, POLICY, T0 + 1)[0]
    again = engine.resume(rolled_back, POLICY, T0 + 2)[0]
    assert (again.state, again.weight) == ("progressing", 5)  # after a rollback: the first stage


def test_reset_starts_in_shadow_again():
    progressing = RolloutState(state="progressing", weight=50, stage_started_at=T0)
    state, decision = engine.reset(progressing, POLICY, T0 + 5)
    assert (state.state, state.weight, state.stage_started_at) == ("shadow", 0, T0 + 5)
    assert decision.new_stage
    assert engine.reset(progressing, replace(POLICY, shadow=0.0), T0 + 5)[0].weight == 5


def test_no_automatic_promotion_from_shadow_without_auto_promote():
    analysis, evidence = HEALTHY
    assert decide(SHADOW, analysis, evidence, replace(POLICY, auto_promote=False), T0 + 31)[2] is None


def test_shadow_settings_are_read_and_checked(tmp_path):
    from tests.test_config import MINIMAL, load, problems

    rollout = load(tmp_path, MINIMAL + "rollout: {shadow: 10m, shadow_share: 25, shadow_methods: [get, OPTIONS]}\n").rollout
    assert (rollout.shadow, rollout.shadow_share, rollout.shadow_methods) == (600.0, 25, ("GET", "OPTIONS"))
    default = load(tmp_path, MINIMAL).rollout
    assert (default.shadow, default.shadow_share, default.shadow_methods) == (0.0, 100, ("GET", "HEAD"))
    assert Policy.from_settings(rollout, load(tmp_path, MINIMAL).analysis).shadow == 600.0
    bad = problems(tmp_path, MINIMAL + "rollout: {shadow: soon, shadow_share: 0, shadow_methods: []}\n")
    assert [line.split(": ", 2)[1] for line in bad] == ["rollout.shadow", "rollout.shadow_share", "rollout.shadow_methods"]
    assert "must list at least one method" in bad[2]
    refused = problems(tmp_path, MINIMAL + "rollout: {shadow_methods: [GET, connect]}\n")
    assert len(refused) == 1 and "rollout.shadow_methods[1]: CONNECT is never forwarded" in refused[0]
    off = problems(tmp_path, MINIMAL + "analysis: {latency: {regression: {p95_ratio: .inf}}}\n")
    assert len(off) == 1 and "analysis.latency.regression.p95_ratio: expected a ratio above 1" in off[0]
