"""The controller with a real store in tmp_path, a real recorder and injected clocks:
what is saved, what traffic does, and in which order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from config.errors import StateCorrupt, StateError
from config.settings import AnalysisSettings, RolloutSettings, Settings, UpstreamSettings, Upstreams
from rollout.controller import RolloutController, record_offline_rollback
from rollout.evidence import OutcomeRecorder
from rollout.state import RolloutState, Transition
from rollout.store import JsonFileStore, Stored, Write

T0 = 1_700_000_000.0


def make_settings(*, weight: int | None = None, bake: float = 60.0, **analysis: Any) -> Settings:
    upstreams = Upstreams(
        baseline=UpstreamSettings(name="baseline", url="http://127.0.0.1:9001"),
        canary=UpstreamSettings(name="canary", url="http://127.0.0.1:9002"),
    )
    return Settings(
        upstreams=upstreams,
        rollout=RolloutSettings(stages=(5, 25, 50, 100), bake=bake, min_requests=50, weight=weight),
        analysis=AnalysisSettings(**{"min_requests": 20, **analysis}),
    )


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingSplit:
    """The proxy's router stand-in: remembers each weight and what the store said then."""

    store: JsonFileStore
    recorder: OutcomeRecorder
    calls: list[tuple[int, int | None, int]] = field(default_factory=list)
    shadow: bool = False  # whether the proxy is told to mirror to the canary

    def set_shadow(self, active: bool) -> None:
        self.shadow = active

    def set_weight(self, weight: int) -> None:
        try:
            stored = self.store.load()
        except StateCorrupt:
            stored = None
        generation = self.recorder.arms["canary"].generation
        self.calls.append((weight, stored.state.weight if stored else None, generation))


@dataclass
class Rig:
    controller: RolloutController
    store: JsonFileStore
    split: RecordingSplit
    recorder: OutcomeRecorder
    clock: Clock
    mono: Clock

    def traffic(self, canary: tuple[int, int], baseline: tuple[int, int] = (190, 2)) -> None:
        """Requests that finish within this tick: (count, errors) per arm."""
        for arm, (count, errors) in (("canary", canary), ("baseline", baseline)):
            recorder = self.recorder.arms[arm]  # type: ignore[index]
            for i in range(count):
                request = recorder.begin(self.mono.now)
                recorder.finish(request, 500 if i < errors else 200, self.mono.now + 0.05)

    def tick(self, seconds: float = 1.0) -> Any:
        self.clock.now += seconds
        self.mono.now += seconds
        return self.controller.tick()


def rig(tmp_path: Path, settings: Settings | None = None, *, start: bool = True) -> Rig:
    settings = settings or make_settings()
    store = JsonFileStore(tmp_path / "state.json")
    recorder = OutcomeRecorder(window=60.0, warn_limit=settings.analysis.latency.p95_warning,
                               crit_limit=settings.analysis.latency.p99_critical)
    split = RecordingSplit(store, recorder)
    clock, mono = Clock(T0), Clock(100.0)
    controller = RolloutController(settings, recorder, split, store, clock=clock, monotonic=mono)
    if start:
        controller.start()
    return Rig(controller, store, split, recorder, clock, mono)


def test_first_start_saves_the_first_stage_then_routes_it(tmp_path: Path) -> None:
    r = rig(tmp_path)
    assert r.split.calls[-1][:2] == (5, 5)  # the store already said 5 when traffic moved
    stored = r.store.load()
    assert stored is not None and [t.action for t in stored.history] == ["start"]
    assert (r.controller.state.state, r.controller.weight) == ("progressing", 5)


def test_first_start_with_a_pinned_weight_is_manual(tmp_path: Path) -> None:
    r = rig(tmp_path, make_settings(weight=30))
    assert (r.controller.state.state, r.controller.weight, r.split.calls[-1][0]) == ("manual", 30, 30)


def test_a_broken_canary_is_rolled_back_saved_before_traffic_moves_and_logged(tmp_path: Path) -> None:
    r = rig(tmp_path)
    generation = r.recorder.arms["canary"].generation
    with capture_logs() as logs:
        transition = None
        for _ in range(30):
            r.traffic(canary=(10, 3))
            transition = transition or r.tick()
    assert transition is not None and transition.action == "rollback"
    assert (r.controller.state.state, r.controller.weight) == ("rolled_back", 0)
    assert r.split.calls[-1] == (0, 0, generation)  # saved first; stage reset after the move
    assert r.recorder.arms["canary"].generation == generation + 1
    event = next(e for e in logs if e["event"] == "rollout_transition")
    assert (event["action"], event["trigger"], event["weight"]) == ("rollback", "auto", 0)
    assert event["log_level"] == "warning"
    evidence = event["evidence"]
    assert evidence["canary"]["error_rate"] == pytest.approx(0.3) and evidence["baseline"]["requests"] > 0
    assert evidence["tests"]["errors.critical"]["open"] and "window" in evidence
    assert r.controller.rollbacks_total == 1
    assert r.controller.history()[-1]["reason"].startswith("critical: canary error rate 30.0%")


def test_a_healthy_canary_is_promoted_only_after_the_bake(tmp_path: Path) -> None:
    r = rig(tmp_path)
    for _ in range(59):
        r.traffic(canary=(10, 0))
        assert r.tick() is None
    r.traffic(canary=(10, 0))
    transition = r.tick()
    assert transition is not None and (transition.action, transition.weight) == ("promote", 25)
    assert r.recorder.arms["canary"].stage_counts().requests == 0  # a new stage of evidence
    assert r.split.calls[-1][:2] == (25, 25)


def test_a_rollback_survives_a_restart_and_healthy_traffic(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.controller.rollback(reason="p99 up")
    again = rig(tmp_path)
    assert (again.controller.state.state, again.controller.weight) == ("rolled_back", 0)
    assert again.split.calls == [(0, 0, 0)]
    for _ in range(100):
        again.traffic(canary=(10, 0))
        assert again.tick() is None
    assert again.controller.history()[-1]["reason"] == "p99 up"


def test_a_restart_keeps_the_bake_clock(tmp_path: Path) -> None:
    rig(tmp_path)
    later = rig(tmp_path, start=False)
    later.clock.now = T0 + 3600
    later.controller.start()
    for _ in range(5):  # enough healthy requests to show every rate below its threshold
        later.traffic(canary=(100, 0), baseline=(1900, 20))
        transition = later.tick()
    assert transition is not None and transition.action == "promote"


def test_a_corrupt_state_file_is_kept_weight_zero_served_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"format": 1, "state": ')
    r = rig(tmp_path)
    assert r.split.calls == [(0, None, 0)]
    status = r.controller.status()
    assert (status["state"], status["weight"]) == ("rolled_back", 0)
    assert "cannot be read" in status["store"]["error"] and "cannot be read" in status["reason"]
    with pytest.raises(StateCorrupt):
        r.controller.resume()
    for _ in range(10):
        r.traffic(canary=(10, 5))
        r.tick()
    assert path.read_bytes() == b'{"format": 1, "state": '
    path.unlink()  # the operator removes it: the plan starts again
    r.tick()
    assert (r.controller.state.state, r.controller.weight) == ("progressing", 5)
    assert r.controller.status()["store"]["error"] is None


def test_an_offline_rollback_is_adopted_on_the_next_tick(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.tick()
    record_offline_rollback(JsonFileStore(tmp_path / "state.json"), reason="admin API down", now=T0 + 5)
    r.traffic(canary=(10, 0))
    r.tick()
    assert (r.controller.state.state, r.controller.weight, r.split.calls[-1][0]) == ("rolled_back", 0, 0)
    assert r.controller.history()[-1]["reason"] == "admin API down"
    assert r.controller.rollbacks_total == 1  # counted in canary_rollbacks_total too


def test_an_offline_rollback_without_any_state_starts_rolled_back(tmp_path: Path) -> None:
    record_offline_rollback(JsonFileStore(tmp_path / "state.json"), reason="not yet", now=T0)
    r = rig(tmp_path)
    assert (r.controller.state.state, r.controller.weight) == ("rolled_back", 0)


def test_an_offline_rollback_before_a_first_start_with_a_pinned_weight_holds(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    record_offline_rollback(store, reason="not yet", now=T0, config_weight=30)
    r = rig(tmp_path, make_settings(weight=30))
    assert (r.controller.state.state, r.controller.weight, r.split.calls[-1][0]) == ("rolled_back", 0, 0)


def test_every_reload_is_in_the_history_and_keeps_the_state(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.controller.rollback(reason="by hand")
    r.controller.apply_settings(make_settings(bake=120.0))
    last = r.controller.history()[-1]
    assert (last["action"], last["trigger"], last["state"], last["weight"]) == ("reload", "config", "rolled_back", 0)
    assert r.controller.policy.bake == 120.0


def test_operator_commands_answer_the_new_status(tmp_path: Path) -> None:
    c = rig(tmp_path).controller
    assert (c.promote()["weight"], c.pause()["state"]) == (25, "paused")
    assert c.resume()["state"] == "progressing"
    assert (c.set_weight(40)["state"], c.weight) == ("manual", 40)
    assert c.rollback(reason="by hand")["history"][-1]["reason"] == "by hand"
    assert c.reset()["weight"] == 5
    with pytest.raises(ValueError):
        c.set_weight(140)
    actions = [entry["action"] for entry in c.history()]
    assert actions == ["start", "promote", "pause", "resume", "set_weight", "rollback", "reset"]
    assert {entry["trigger"] for entry in c.history()[1:]} == {"operator"}


def test_a_reloaded_weight_pins_it_and_an_unchanged_one_never_undoes_a_rollback(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.controller.apply_settings(make_settings(weight=30))
    assert (r.controller.state.state, r.controller.weight) == ("manual", 30)
    assert r.controller.history()[-1]["trigger"] == "config"
    r.controller.rollback()
    r.controller.apply_settings(make_settings(weight=30))
    assert r.controller.state.state == "rolled_back"
    restarted = rig(tmp_path, make_settings(weight=30))
    assert (restarted.controller.state.state, restarted.controller.weight) == ("rolled_back", 0)


def test_a_hung_canary_is_rolled_back_within_seconds_of_the_p99_limit(tmp_path: Path) -> None:
    r = rig(tmp_path, make_settings(bake=3600.0))
    canary = r.recorder.arms["canary"]
    for second in range(14):
        for _ in range(5):
            canary.begin(r.mono.now)  # never answered
        r.traffic(canary=(0, 0), baseline=(95, 1))
        transition = r.tick()
        if transition is not None:
            break
    assert transition is not None and transition.action == "rollback"  # not a step back first
    assert 10 <= second <= 12  # the p99 limit is 10 s
    assert "canary requests over 10s" in transition.reason


def test_a_shared_outage_is_reported_not_rolled_back(tmp_path: Path) -> None:
    r = rig(tmp_path)
    for _ in range(60):
        r.traffic(canary=(10, 4), baseline=(190, 76))
        assert r.tick() is None
    verdict = r.controller.status()["verdict"]
    assert verdict["level"] == "critical" and verdict["reasons"][0].startswith("shared outage")
    assert r.controller.weight == 5


def test_status_has_the_contract_fields(tmp_path: Path) -> None:
    r = rig(tmp_path)
    for _ in range(60):
        r.controller.set_weight(60 if r.controller.weight == 40 else 40)
    r.traffic(canary=(10, 1))
    r.tick()
    status = r.controller.status()
    assert {"state", "weight", "stage", "stages", "arms", "verdict", "history"} <= set(status)
    assert (status["stage"], status["stages"], len(status["history"])) == (None, [5, 25, 50, 100], 50)
    for arm in ("baseline", "canary"):
        assert {"requests", "errors", "error_rate", "p50", "p95", "p99", "stage"} <= set(status["arms"][arm])
    assert status["arms"]["canary"]["requests"] == 10 and status["arms"]["canary"]["error_rate"] == 0.1
    assert {"level", "reasons", "tests", "evidence"} == set(status["verdict"])
    assert len(r.controller.history()) == 61


def test_series_keeps_one_point_per_step(tmp_path: Path) -> None:
    r = rig(tmp_path)
    for _ in range(30):
        r.traffic(canary=(2, 0), baseline=(38, 0))
        r.tick()
    series = r.controller.series()
    assert len(series["t"]) == 6 and series["weight"] == [5] * 6
    assert len(series["canary"]["error_rate"]) == len(series["baseline"]["p95"]) == 6


class FailingStore(JsonFileStore):
    def update(self, change: Any) -> Stored | None:
        raise StateError(f"{self.path}: cannot write the rollout state: disk full")


def test_an_unsaved_transition_moves_no_traffic_except_a_rollback(tmp_path: Path) -> None:
    r = rig(tmp_path)
    failing = FailingStore(tmp_path / "state.json")
    r.controller._store = failing  # the disk fills up while running
    with pytest.raises(StateError, match="disk full"):
        r.controller.promote()
    assert r.controller.weight == 5 and r.split.calls[-1][0] == 5
    status = r.controller.rollback()
    assert (status["state"], status["weight"], r.split.calls[-1][0]) == ("rolled_back", 0, 0)
    assert "disk full" in status["store"]["error"]


def test_a_state_file_corrupted_while_running_sends_traffic_to_zero_and_is_kept(tmp_path: Path) -> None:
    r = rig(tmp_path)
    (tmp_path / "state.json").write_bytes(b"oops")
    r.traffic(canary=(10, 0))
    r.tick()
    assert (r.controller.weight, r.split.calls[-1][0]) == (0, 0)
    assert "cannot be read" in r.controller.status()["store"]["error"]
    assert (tmp_path / "state.json").read_bytes() == b"oops"


def test_history_has_every_transition_past_a_thousand_and_status_the_newest_50(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    earlier = tuple(
        Transition(at=T0 + n, action="set_weight", trigger="operator", from_state="manual", state="manual",
                   from_weight=40, weight=40, reason=f"earlier {n}", evidence={"n": n})
        for n in range(1000)
    )
    store.save(Write(state=RolloutState(state="manual", weight=40, stage_started_at=T0), transitions=earlier))
    r = rig(tmp_path)
    assert r.controller.weight == 40 and len(r.controller.status()["history"]) == 50
    for n in range(60):
        r.controller.set_weight(60 if r.controller.weight == 40 else 40, reason=f"flip {n}")
    history = r.controller.history()
    assert [h["reason"] for h in history] == [f"earlier {n}" for n in range(1000)] + [f"flip {n}" for n in range(60)]
    status = r.controller.status()
    assert status["history"] == history[-50:] and status["store"]["revision"] == 61
    recent = json.loads(store.path.read_text())["recent"]  # the state file: the newest 50 only
    assert recent == history[-50:] and store.path.stat().st_size < 128 * 1024
    restarted = rig(tmp_path)
    assert restarted.controller.status()["history"] == history[-50:] and restarted.controller.history() == history


def test_a_commit_is_not_read_back_but_a_write_right_after_it_is_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(tmp_path)
    store = JsonFileStore(tmp_path / "state.json")  # the split reads r.store: not counted
    loads: list[int] = []
    monkeypatch.setattr(store, "load", lambda: loads.append(1) or JsonFileStore.load(store))
    r.controller._store = store
    r.controller.promote()
    r.tick()
    r.tick()
    assert not loads  # what the controller wrote itself is not read again
    record_offline_rollback(JsonFileStore(tmp_path / "state.json"), reason="right after", now=T0 + 2)
    r.tick()
    assert len(loads) == 1 and (r.controller.state.state, r.controller.weight) == ("rolled_back", 0)
    assert [h["action"] for h in r.controller.history()] == ["start", "promote", "rollback"]


def test_an_unreadable_history_falls_back_to_the_newest_transitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(tmp_path)
    r.controller.pause(reason="look")

    def unreadable() -> list[Transition]:
        raise StateError("state.history.jsonl: cannot read the rollout history: permission denied")

    monkeypatch.setattr(r.store, "history", unreadable)
    with capture_logs() as logs:
        history = r.controller.history()
    assert [h["action"] for h in history] == ["start", "pause"]
    assert any(e["event"] == "rollout_history_unreadable" for e in logs)


def test_a_state_file_of_the_older_layout_is_adopted_and_migrated(tmp_path: Path) -> None:
    old = rig(tmp_path)
    old.controller.pause(reason="old layout")
    path = tmp_path / "state.json"
    data = json.loads(path.read_text())
    data["history"] = data.pop("recent") * 30  # 60 transitions inside, as the store kept them before
    path.write_text(json.dumps(data))
    (tmp_path / "state.history.jsonl").unlink()
    r = rig(tmp_path)
    assert (r.controller.state.state, len(r.controller.status()["history"]), len(r.controller.history())) == (
        "paused", 50, 60)
    r.controller.resume(reason="new layout")
    assert len(r.controller.history()) == 61 and r.controller.history()[-1]["reason"] == "new layout"
    assert "history" not in json.loads(path.read_text())


def test_a_state_file_removed_while_running_is_written_again_and_the_history_kept(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.controller.promote(reason="on")
    (tmp_path / "state.json").unlink()
    r.tick()
    stored = r.store.load()
    assert stored is not None and (stored.state.weight, stored.state.revision) == (25, 3)
    assert [h["action"] for h in r.controller.history()] == ["start", "promote"]
    r.controller.pause(reason="after")
    assert [h["action"] for h in r.controller.history()] == ["start", "promote", "pause"]
