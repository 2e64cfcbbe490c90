"""The pure rollout core: every state x every trigger, operator commands, config
changes, and the invariants (hypothesis) that must hold whatever happens."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from config.settings import AnalysisSettings, ErrorThresholds, RolloutSettings
from rollout import engine
from rollout.engine import Evidence, Policy, decide
from rollout.evidence import StageCounts
from rollout.sprt import ABSOLUTE_TESTS, COMPARE_TESTS, AnalysisState
from rollout.state import RolloutState
from rollout.verdict import judge

POLICY = Policy(stages=(5, 25, 50, 100), bake=60.0, min_requests=10, analysis_min_requests=5)
T0 = 1_700_000_000.0
BAKED = T0 + 61
_SLOTS = {name: i for i, name in enumerate(ABSOLUTE_TESTS)} | {
    f"compare.{name}": 4 + i for i, name in enumerate(COMPARE_TESTS)
}


def rs(state: str, weight: int, latched: str | None = None, **kw: Any) -> RolloutState:
    return RolloutState(state=state, weight=weight, stage_started_at=T0, latched=latched, **kw)  # type: ignore[arg-type]


def signals(*names: str, canary: tuple[int, int] = (1000, 10), baseline: tuple[int, int] = (4000, 40),
            excursion: tuple[int, int] = (2000, 80)) -> tuple[AnalysisState, Evidence]:
    """An analysis with exactly `names` open, already up to date with the evidence.
    The default error excursion (4% over 2000) rules the critical level out."""
    evidence = Evidence(
        canary=StageCounts(requests=canary[0], errors=canary[1]),
        baseline=StageCounts(requests=baseline[0], errors=baseline[1]),
    )
    opened = tuple(i in {_SLOTS[n] for n in names} for i in range(7))
    analysis = AnalysisState(
        seen=(canary[0], canary[1], 0, 0, baseline[0], baseline[1], 0, 0),
        scores=tuple(9.0 if o else 0.0 for o in opened),
        opened=opened,
        excursion=(*excursion, 0, 0),
    )
    return analysis, evidence


TRIGGERS: dict[str, tuple[tuple[AnalysisState, Evidence], float]] = {
    "healthy, baked": (signals(), BAKED),
    "healthy, baking": (signals(), T0 + 30),
    "insufficient data": (signals("errors.critical", "compare.errors", canary=(3, 3)), BAKED),
    "warning": (signals("errors.warning", "compare.errors", canary=(400, 34)), BAKED),
    "critical": (signals("errors.warning", "errors.critical", "compare.errors", canary=(200, 60)), BAKED),
    "shared outage": (signals("errors.warning", "errors.critical", canary=(200, 60), baseline=(4000, 1200)), BAKED),
    "warning that could be critical": (
        signals("errors.warning", "compare.errors", canary=(50, 10), excursion=(50, 10)), BAKED),
    "hung canary (p95 only so far)": (
        signals("latency.p95_warning", "compare.slow_warning"), BAKED),
}
STATES = {
    "progressing 25": rs("progressing", 25),
    "paused 25 (operator)": rs("paused", 25),
    "held at 5 after a warning": rs("paused", 5, "warning"),
    "held at 0 after a warning": rs("paused", 0, "warning"),
    "manual 30": rs("manual", 30),
    "rolled back": rs("rolled_back", 0, "critical"),
    "promoted": rs("promoted", 100),
}
STEP_BACK = {"progressing 25": 5, "paused 25 (operator)": 5, "manual 30": 25, "promoted": 50}
ROLLBACK = ("rollback", "rolled_back", 0)


def expected(state: str, trigger: str) -> tuple[str, str, int] | None:
    """The table, written as rules: CONTRACT §5 with the default actions."""
    if state == "rolled back" or trigger in ("healthy, baking", "insufficient data"):
        return None
    if trigger == "healthy, baked":
        return ("promote", "progressing", 50) if state == "progressing 25" else None
    if trigger == "critical" or (trigger == "shared outage" and state == "promoted"):
        return ROLLBACK
    if trigger == "warning" and state in STEP_BACK:
        return ("step_back", "paused", STEP_BACK[state])
    return None


@pytest.mark.parametrize("trigger", list(TRIGGERS))
@pytest.mark.parametrize("state_name", list(STATES))
def test_every_state_and_automatic_trigger(state_name: str, trigger: str) -> None:
    (analysis, evidence), now = TRIGGERS[trigger]
    state = STATES[state_name]
    new, _, decision = decide(state, analysis, evidence, POLICY, now)
    want = expected(state_name, trigger)
    if want is None:
        assert decision is None and new == state
        return
    assert decision is not None
    transition = decision.transition
    assert (transition.action, new.state, new.weight) == want
    assert (transition.trigger, transition.from_weight, transition.weight) == ("auto", state.weight, new.weight)
    assert decision.new_stage == (new.weight != state.weight)
    assert new.stage_started_at == (now if decision.new_stage else T0)


def test_an_automatic_action_records_the_figures_behind_it() -> None:
    (analysis, evidence), now = TRIGGERS["critical"]
    _, _, decision = decide(rs("progressing", 25), analysis, evidence, POLICY, now)
    assert decision is not None
    figures = decision.transition.evidence
    assert figures["canary"] == {"requests": 200, "errors": 60, "error_rate": 0.3, "slow_warning": 0, "slow_critical": 0}
    assert figures["baseline"]["error_rate"] == 0.01
    assert figures["tests"]["errors.critical"]["open"] and figures["tests"]["errors.critical"]["threshold"] > 0
    assert figures["thresholds"]["errors.critical"] == 0.10
    assert figures["comparison"]["error_rate_diff"] == pytest.approx(0.29)
    assert "canary error rate 30.0% (60/200, CI" in decision.transition.reason


def test_a_shared_outage_is_reported_in_the_verdict_but_not_acted_on() -> None:
    (analysis, evidence), now = TRIGGERS["shared outage"]
    verdict = judge(analysis, evidence, POLICY, 25)
    assert verdict.level == "critical" and verdict.confirmed is None
    assert verdict.reasons[0].startswith("shared outage: canary error rate 30.0%")
    assert "not rolled back" in verdict.reasons[0]


def test_below_min_requests_there_is_no_verdict() -> None:
    (analysis, evidence), _ = TRIGGERS["insufficient data"]
    verdict = judge(analysis, evidence, POLICY, 25)
    assert verdict.level == "insufficient_data"
    assert verdict.reasons == ("insufficient data: 3 of 5 canary requests at this stage",)


def test_a_latched_action_does_not_repeat_but_a_worse_one_still_fires() -> None:
    (analysis, evidence), now = TRIGGERS["warning"]
    pause_policy = replace(POLICY, on_warning="pause")
    held, _, decision = decide(rs("progressing", 25), analysis, evidence, pause_policy, now)
    assert decision is not None and (held.state, held.weight, held.latched) == ("paused", 25, "warning")
    assert not decision.new_stage
    assert decide(held, analysis, evidence, pause_policy, now + 1)[2] is None
    (analysis, evidence), now = TRIGGERS["critical"]
    rolled, _, decision = decide(held, analysis, evidence, pause_policy, now + 2)
    assert decision is not None and (rolled.state, rolled.weight) == ("rolled_back", 0)


@pytest.mark.parametrize(
    "policy_change, trigger, want",
    [
        ({"on_warning": "pause"}, "warning", ("pause", "paused", 25)),
        ({"on_warning": "rollback"}, "warning", ROLLBACK),
        ({"on_critical": "step_back"}, "critical", ("step_back", "paused", 5)),
        ({"on_critical": "pause"}, "critical", ("pause", "paused", 25)),
        ({"on_critical": "step_back"}, "warning that could be critical", ("step_back", "paused", 5)),
        ({"compare_baseline": False}, "shared outage", ROLLBACK),
        ({"auto_promote": False}, "healthy, baked", None),
        ({"min_requests": 5000}, "healthy, baked", None),
        ({"stages": (10, 30, 100)}, "healthy, baked", ("promote", "progressing", 30)),
    ],
)
def test_policy_variants(policy_change: dict[str, Any], trigger: str, want: tuple[str, str, int] | None) -> None:
    (analysis, evidence), now = TRIGGERS[trigger]
    new, _, decision = decide(rs("progressing", 25), analysis, evidence, replace(POLICY, **policy_change), now)
    got = None if decision is None else (decision.transition.action, new.state, new.weight)
    assert got == want


def test_after_the_last_stage_the_rollout_is_promoted() -> None:
    (analysis, evidence), now = TRIGGERS["healthy, baked"]
    new, _, decision = decide(rs("progressing", 100), analysis, evidence, POLICY, now)
    assert decision is not None and (new.state, new.weight, decision.new_stage) == ("promoted", 100, False)


def test_a_pinned_weight_resumed_promotes_to_the_smallest_stage_above_it() -> None:
    (analysis, evidence), now = TRIGGERS["healthy, baked"]
    new, _, _ = decide(rs("progressing", 30), analysis, evidence, POLICY, now)
    assert (new.state, new.weight) == ("progressing", 50)


def _slow(pending: int, slow_critical: int = 0) -> tuple[AnalysisState, Evidence]:
    """p95 warning open and confirmed; 30 slow canary requests, `pending` still in flight."""
    analysis, evidence = signals("latency.p95_warning", "compare.slow_warning")
    canary = StageCounts(requests=200, errors=2, slow_warning=30, slow_critical=slow_critical, slow_pending=pending)
    seen = (200, 2, 30, slow_critical, *analysis.seen[4:])
    return replace(analysis, seen=seen, excursion=(0, 0, 30, slow_critical)), replace(evidence, canary=canary)


def test_a_hung_canary_is_not_stepped_back_while_its_requests_hang() -> None:
    analysis, evidence = _slow(pending=30)
    assert decide(rs("progressing", 5), analysis, evidence, POLICY, BAKED)[2] is None
    assert "held while the evidence still fits the critical level" in judge(analysis, evidence, POLICY, 5).reasons[0]


def test_a_slow_canary_whose_requests_finish_below_p99_is_stepped_back() -> None:
    analysis, evidence = _slow(pending=4)
    new, _, decision = decide(rs("progressing", 25), analysis, evidence, POLICY, BAKED)
    assert decision is not None and (decision.transition.action, new.weight) == ("step_back", 5)
    assert "canary requests over 5s 15.0% (30/200, CI 8.5%–23.5%) past latency.p95_warning" in decision.transition.reason


def test_a_warning_that_could_be_critical_waits_for_the_critical_test() -> None:
    (analysis, evidence), now = TRIGGERS["warning that could be critical"]
    state = rs("progressing", 5)
    assert decide(state, analysis, evidence, POLICY, now)[2] is None
    opened = tuple(o or i == 1 for i, o in enumerate(analysis.opened))  # errors.critical opens
    new, _, decision = decide(state, replace(analysis, opened=opened), evidence, POLICY, now + 1)
    assert decision is not None and (new.state, new.weight) == ("rolled_back", 0)


# -- operator commands --------------------------------------------------------------------

COMMANDS = {
    "promote": lambda s: engine.promote(s, POLICY, BAKED),
    "pause": lambda s: engine.pause(s, POLICY, BAKED),
    "resume": lambda s: engine.resume(s, POLICY, BAKED),
    "rollback": lambda s: engine.rollback(s, POLICY, BAKED, reason="p99 up"),
    "reset": lambda s: engine.reset(s, POLICY, BAKED),
    "set_weight 40": lambda s: engine.set_weight(s, POLICY, BAKED, 40),
}
COMMAND_STATES = {
    "progressing 25": rs("progressing", 25),
    "paused 25": rs("paused", 25),
    "paused 0": rs("paused", 0, "warning"),
    "manual 30": rs("manual", 30),
    "rolled back": rs("rolled_back", 0, "critical"),
    "promoted": rs("promoted", 100),
}
_P, _PA, _RB, _M = "progressing", "paused", "rolled_back", "manual"
COMMAND_TABLE = {  # state -> command -> (state, weight) after, None = no transition
    "progressing 25": {"promote": (_P, 50), "pause": (_PA, 25), "resume": None, "rollback": (_RB, 0)},
    "paused 25": {"promote": (_P, 50), "pause": None, "resume": (_P, 25), "rollback": (_RB, 0)},
    "paused 0": {"promote": (_P, 5), "pause": None, "resume": (_P, 5), "rollback": (_RB, 0)},
    "manual 30": {"promote": (_P, 50), "pause": (_PA, 30), "resume": (_P, 30), "rollback": (_RB, 0)},
    "rolled back": {"promote": (_P, 5), "pause": None, "resume": (_P, 5), "rollback": None},
    "promoted": {"promote": None, "pause": (_PA, 100), "resume": None, "rollback": (_RB, 0)},
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("state_name", list(COMMAND_STATES))
def test_every_state_and_operator_command(state_name: str, command: str) -> None:
    state = COMMAND_STATES[state_name]
    want = COMMAND_TABLE[state_name].get(command, {"reset": (_P, 5), "set_weight 40": (_M, 40)}.get(command))
    new, decision = COMMANDS[command](state)
    if want is None:
        assert decision is None and new == state
        return
    assert decision is not None and (new.state, new.weight) == want
    transition = decision.transition
    assert (transition.action, transition.trigger) == (command.split()[0], "operator")
    assert new.latched is None  # an operator action clears any latch
    if new.state == "progressing":
        assert decision.new_stage and new.stage_started_at == BAKED  # a fresh bake


def test_rollback_reason_is_recorded() -> None:
    new, decision = COMMANDS["rollback"](rs("progressing", 25))
    assert decision is not None and decision.transition.reason == "p99 up" and new.reason == "p99 up"


@pytest.mark.parametrize("percent", [-1, 101, 2.5, True, "30"])
def test_set_weight_rejects_anything_but_a_whole_percent(percent: Any) -> None:
    with pytest.raises(ValueError, match="whole percent"):
        engine.set_weight(rs("progressing", 25), POLICY, BAKED, percent)


# -- first start and config changes ---------------------------------------------------------


def test_first_start_is_the_first_stage_progressing() -> None:
    state, decision = engine.initial_state(POLICY, None, T0)
    assert (state.state, state.weight, state.stage_started_at) == ("progressing", 5, T0)
    assert (decision.transition.action, decision.transition.trigger) == ("start", "config")


def test_first_start_with_a_pinned_weight_is_manual() -> None:
    state, _ = engine.initial_state(POLICY, 30, T0)
    assert (state.state, state.weight, state.config_weight) == ("manual", 30, 30)


def test_an_unchanged_config_weight_never_undoes_a_rollback() -> None:
    rolled = rs("rolled_back", 0, config_weight=30)
    assert engine.apply_config(rolled, POLICY, 30, BAKED) == (rolled, None)


def test_a_changed_config_weight_is_set_weight_by_config() -> None:
    new, decision = engine.apply_config(rs("rolled_back", 0, config_weight=30), POLICY, 40, BAKED)
    assert decision is not None
    assert (new.state, new.weight, new.config_weight) == ("manual", 40, 40)
    assert (decision.transition.action, decision.transition.trigger) == ("set_weight", "config")


def test_removing_the_config_weight_resumes_a_manual_rollout() -> None:
    new, decision = engine.apply_config(rs("manual", 30, config_weight=30), POLICY, None, BAKED)
    assert decision is not None and (new.state, new.weight, new.config_weight) == ("progressing", 30, None)


def test_removing_the_config_weight_keeps_a_rollback() -> None:
    new, decision = engine.apply_config(rs("rolled_back", 0, "critical", config_weight=30), POLICY, None, BAKED)
    assert decision is not None and decision.transition.action == "reload"
    assert (new.state, new.weight, new.latched, new.config_weight) == ("rolled_back", 0, "critical", None)


def test_policy_from_settings() -> None:
    policy = Policy.from_settings(
        RolloutSettings(stages=(10, 100), bake=5.0, min_requests=7, auto_promote=False),
        AnalysisSettings(min_requests=3, errors=ErrorThresholds(warning=0.02, critical=0.04), on_warning="pause"),
    )
    assert (policy.stages, policy.bake, policy.min_requests, policy.auto_promote) == ((10, 100), 5.0, 7, False)
    assert (policy.analysis_min_requests, policy.on_warning, policy.plan.absolute[0].p0) == (3, "pause", 0.02)


# -- invariants ------------------------------------------------------------------------------

# a run of `n` ticks `dt` apart with the same traffic: (n, dt, canary requests, error share, baseline ...)
ticks = st.tuples(st.just("ticks"), st.integers(1, 40), st.floats(0.0, 10.0), st.integers(0, 25),
                  st.sampled_from([0.01, 0.0, 0.09, 0.3, 1.0]), st.integers(0, 200), st.sampled_from([0.01, 0.0, 0.3]))
command = st.tuples(st.just("command"), st.sampled_from(["promote", "pause", "resume", "rollback", "reset"]))
pin = st.one_of(st.tuples(st.just("set_weight"), st.integers(0, 100)),
                st.tuples(st.just("config"), st.one_of(st.none(), st.integers(0, 100))))
steps = st.lists(st.one_of(ticks, ticks, command, pin), max_size=30)


@dataclass
class World:
    """The rollout as the controller would drive it: state, analysis, stage counts."""

    state: RolloutState
    now: float = T0
    analysis: AnalysisState = field(default_factory=AnalysisState)
    canary: tuple[int, int] = (0, 0)
    baseline: tuple[int, int] = (0, 0)
    pinned: set[int] = field(default_factory=set)

    def tick(self, dt: float, canary: tuple[int, float], baseline: tuple[int, float]) -> None:
        before, self.now = self.state, self.now + dt
        self.canary = (self.canary[0] + canary[0], self.canary[1] + round(canary[0] * canary[1]))
        self.baseline = (self.baseline[0] + baseline[0], self.baseline[1] + round(baseline[0] * baseline[1]))
        evidence = Evidence(canary=StageCounts(requests=self.canary[0], errors=self.canary[1]),
                            baseline=StageCounts(requests=self.baseline[0], errors=self.baseline[1]))
        self.state, self.analysis, decision = decide(before, self.analysis, evidence, POLICY, self.now)
        if before.state == "rolled_back":  # never left without an operator
            assert (self.state.state, decision) == ("rolled_back", None)
        if decision is not None and decision.transition.trigger == "auto" and before.latched:
            assert (before.latched, self.state.latched) == ("warning", "critical")  # latched
        if self.state.weight > before.weight:  # raising weight never precedes the bake
            assert self.now - before.stage_started_at >= POLICY.bake
            assert self.canary[0] >= POLICY.min_requests
        self.after(decision)

    def command(self, step: tuple[Any, ...]) -> None:
        if step[0] == "command":
            self.state, decision = getattr(engine, step[1])(self.state, POLICY, self.now)
        elif step[0] == "set_weight":
            self.state, decision = engine.set_weight(self.state, POLICY, self.now, step[1])
        else:
            self.state, decision = engine.apply_config(self.state, POLICY, step[1], self.now)
        self.pinned |= {step[1]} - {None} if step[0] != "command" else set()
        self.after(decision)

    def after(self, decision: engine.Decision | None) -> None:
        assert self.state.weight in {0, *POLICY.stages, *self.pinned}  # stage values, 0 or a pin
        if decision is not None:
            event(f"{decision.transition.trigger} {decision.transition.action}")
            if decision.new_stage:
                self.analysis, self.canary, self.baseline = AnalysisState(), (0, 0), (0, 0)


@settings(max_examples=300, deadline=None)
@given(steps=steps, initial_pin=st.one_of(st.none(), st.integers(0, 100)))
def test_invariants_hold_whatever_happens(steps: list[tuple[Any, ...]], initial_pin: int | None) -> None:
    world = World(state=engine.initial_state(POLICY, initial_pin, T0)[0], pinned={initial_pin} - {None})
    for step in steps:
        if step[0] != "ticks":
            world.command(step)
            continue
        _, n, dt, c_req, c_frac, b_req, b_frac = step
        for _ in range(n):
            world.tick(dt, (c_req, c_frac), (b_req, b_frac))


@settings(max_examples=100, deadline=None)
@given(c_req=st.integers(0, 500), c_err=st.integers(0, 500), b_req=st.integers(0, 5000), b_err=st.integers(0, 5000),
       dt=st.floats(0, 1000))
def test_decide_is_a_pure_function(c_req: int, c_err: int, b_req: int, b_err: int, dt: float) -> None:
    evidence = Evidence(canary=StageCounts(requests=c_req, errors=min(c_err, c_req)),
                        baseline=StageCounts(requests=b_req, errors=min(b_err, b_req)))
    state = rs("progressing", 25)
    first = decide(state, AnalysisState(), evidence, POLICY, T0 + dt)
    assert decide(state, AnalysisState(), evidence, POLICY, T0 + dt) == first


def test_the_public_surface_is_deliberate() -> None:
    import rollout

    assert sorted(rollout.__all__) == sorted([
        "STATES", "AnalysisState", "ArmSnapshot", "Decision", "Evidence", "JsonFileStore", "OutcomeRecorder",
        "Policy", "RolloutController", "RolloutState", "StageCounts", "StateStore", "Stored", "TrafficSplit",
        "Transition", "Verdict", "decide", "record_offline_rollback",
    ])
    assert all(hasattr(rollout, name) for name in rollout.__all__)
    assert {"promote", "pause", "resume", "rollback", "reset", "set_weight", "apply_config"} <= set(engine.__all__)
