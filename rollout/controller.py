"""The effectful shell around the pure engine: read the evidence, decide, save, move traffic.

Order on every transition: save to the store, then `split.set_weight` and a new stage of
evidence, then one structured log event with the figures. The clocks are injected (wall
clock for the persisted times, the proxy's monotonic clock for the outcome recorder).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, Protocol

import structlog

from config.errors import StateCorrupt, StateError
from config.settings import ARMS, Settings
from rollout import engine
from rollout.engine import Decision, Evidence, Policy
from rollout.evidence import ArmSnapshot, EvidenceSource, StageCounts
from rollout.sprt import AnalysisState
from rollout.state import RolloutState, Transition, stage_number, to_iso
from rollout.store import RECENT_HISTORY, StateStore, Stored, Write, record_offline_rollback
from rollout.verdict import Verdict, judge

__all__ = ["RolloutController", "TrafficSplit", "record_offline_rollback"]

STATUS_HISTORY = RECENT_HISTORY  # kept in memory for /status; /history reads the store
_EMPTY = Evidence(canary=StageCounts(), baseline=StageCounts())
_UNKNOWN = object()  # a store version that matches nothing
Command = Callable[..., tuple[RolloutState, Decision | None]]


class TrafficSplit(Protocol):
    """Where the controller moves traffic: the proxy's router."""

    def set_weight(self, weight: int) -> None: ...

    def set_shadow(self, active: bool) -> None:
        """Mirror copies of eligible requests to the canary (state `shadow`) or not."""
        ...


class RolloutController:
    """Ticks the engine, persists and applies its decisions, answers status."""

    def __init__(
        self,
        settings: Settings,
        recorder: EvidenceSource,
        split: TrafficSplit,
        store: StateStore,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        logger: Any = None,
        series_step: float = 5.0,
        series_span: float = 600.0,
        gate: Callable[[Transition], bool] | None = None,
    ) -> None:
        self._recorder, self._split, self._store = recorder, split, store
        self._gate = gate  # a shared rollout: may this replica take this automatic step?
        self._clock, self._monotonic = clock, monotonic
        self._log = logger if logger is not None else structlog.get_logger("canary.rollout")
        self.policy = Policy.from_settings(settings.rollout, settings.analysis)
        self._config_weight = settings.rollout.weight
        self._state = RolloutState(
            state="rolled_back", weight=0, stage_started_at=clock(), reason="not started"
        )
        self._history: list[Transition] = []
        self._analysis = AnalysisState()
        self._evidence = _EMPTY
        self._version: Hashable = _UNKNOWN
        self.store_error: str | None = None
        self._store_corrupt = False
        self._series_step = series_step
        self._series: deque[dict[str, Any]] = deque(maxlen=max(1, int(series_span / series_step)))
        self._series_due = float("-inf")
        self.rollbacks_total = 0

    # -- reading ----------------------------------------------------------------------
    @property
    def state(self) -> RolloutState:
        return self._state

    @property
    def weight(self) -> int:
        return self._state.weight

    def verdict(self) -> Verdict:
        return judge(self._analysis, self._evidence, self.policy, self._state.weight)

    def history(self) -> list[dict[str, Any]]:
        """Every stored transition, newest last (read from the store on each call); when
        the store cannot be read, the newest ones this controller knows."""
        try:
            transitions = self._store.history()
        except StateError as exc:
            self._log.warning("rollout_history_unreadable", error=str(exc))
            transitions = self._history
        return [transition.to_json() for transition in transitions]

    def status(self) -> dict[str, Any]:
        """The CONTRACT §6 /status fields this controller owns (the caller adds `config`)."""
        state, now = self._state, self._clock()
        snapshots = self._recorder.snapshot(self._monotonic())
        return {
            "state": state.state,
            "weight": state.weight,
            "stage": stage_number(state.weight, self.policy.stages),
            "stages": list(self.policy.stages),
            "reason": state.reason,
            "latched": state.latched,
            "stage_started_at": to_iso(state.stage_started_at),
            "bake": {
                "elapsed": round(max(0.0, now - state.stage_started_at), 3),
                "required": self.policy.bake_for(state.state),
            },
            "arms": {arm: _arm_status(snapshots[arm]) for arm in ARMS},
            "verdict": self.verdict().to_json(),
            "history": [transition.to_json() for transition in self._history],
            "store": {"revision": state.revision, "error": self.store_error},
            "rollbacks_total": self.rollbacks_total,
        }

    def series(self) -> dict[str, Any]:
        """Both arms' window error rate and p95 over the last ~10 minutes, for the dashboard:
        parallel lists, oldest first (`t` in epoch seconds)."""
        points = list(self._series)
        return {
            "step": self._series_step,
            "t": [p["t"] for p in points],
            "weight": [p["weight"] for p in points],
            **{arm: {key: [p[arm][key] for p in points] for key in ("error_rate", "p95")} for arm in ARMS},
        }

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Load the stored rollout (or make the first one) and route traffic to match it."""
        now = self._clock()
        try:
            stored = self._store.load()
        except StateError as exc:
            self._refuse_store(exc, route=False)
        else:
            if stored is None:
                self._first_start(now)
            else:
                self._adopt(stored, "loaded", route=False)
                self._apply_config(now)
        self._split.set_weight(self._state.weight)
        self._sync_shadow()
        self._new_stage()

    def tick(self) -> Transition | None:
        """One analysis step (every analysis.interval): at most one transition."""
        now = self._clock()
        self._recorder.sweep(self._monotonic())
        self._check_external(now)
        counts = self._recorder.stage_counts()
        self._evidence = Evidence(canary=counts["canary"], baseline=counts["baseline"])
        self._record_series(now)
        state, analysis, decision = engine.decide(self._state, self._analysis, self._evidence, self.policy, now)
        if decision is None or self._store_corrupt or (self._gate and not self._gate(decision.transition)):
            self._analysis = analysis
            return None
        return decision.transition if self._commit(state, decision) else None

    def refresh(self) -> None:
        """Pick up a change stored by another writer now (a shared backend's notification)."""
        self._check_external(self._clock())

    def apply_settings(self, settings: Settings) -> None:
        """Hot reload: new policy; a changed `rollout.weight` acts like set-weight."""
        policy = Policy.from_settings(settings.rollout, settings.analysis)
        if policy.plan != self.policy.plan:
            self._analysis = self._analysis.rescored()
        self.policy = policy
        self._config_weight = settings.rollout.weight
        if self._store_corrupt:
            return
        now = self._clock()
        if not self._apply_config(now):
            state, decision = engine.reload(self._state, now, reason="config reloaded")
            self._commit(state, decision)

    # -- operator commands (each answers the new status) ----------------------------------
    def promote(self, reason: str = "") -> dict[str, Any]:
        return self._command(engine.promote, reason)

    def pause(self, reason: str = "") -> dict[str, Any]:
        return self._command(engine.pause, reason)

    def resume(self, reason: str = "") -> dict[str, Any]:
        return self._command(engine.resume, reason)

    def rollback(self, reason: str = "") -> dict[str, Any]:
        return self._command(engine.rollback, reason)

    def reset(self, reason: str = "") -> dict[str, Any]:
        return self._command(engine.reset, reason)

    def set_weight(self, percent: int, reason: str = "") -> dict[str, Any]:
        """Pin the weight (ValueError unless a whole percent 0..100)."""
        return self._command(lambda *args, **kw: engine.set_weight(*args[:3], percent, **kw), reason)

    def _command(self, command: Command, reason: str) -> dict[str, Any]:
        self._check_external(self._clock())
        if self._store_corrupt:
            raise StateCorrupt(self.store_error or "the rollout state cannot be read")
        for _attempt in range(3):
            now = self._clock()
            figures = self.verdict().figures
            state, decision = command(self._state, self.policy, now, reason=reason, evidence=figures)
            if decision is None or self._commit(state, decision):
                return self.status()
            if self.store_error:
                raise StateError(self.store_error)
        raise StateError("the rollout state kept changing underneath; try again")

    # -- internals ------------------------------------------------------------------------
    def _first_start(self, now: float) -> None:
        self._state = RolloutState(state="progressing", weight=0, stage_started_at=now, revision=0)
        state, decision = engine.initial_state(self.policy, self._config_weight, now)
        if not self._commit(state, decision, move=False) and self._state.revision == 0:
            reason = f"state store unwritable: {self.store_error}"
            self._state = replace(self._state, state="rolled_back", reason=reason)

    def _apply_config(self, now: float) -> bool:
        """Apply `rollout.weight` from the config; whether that recorded a transition."""
        state, decision = engine.apply_config(self._state, self.policy, self._config_weight, now)
        return decision is not None and self._commit(state, decision)

    def _commit(self, state: RolloutState, decision: Decision, *, move: bool = True) -> bool:
        """Save first; only a saved transition moves traffic. False when not applied."""
        transition = self._with_window(decision.transition)
        expected = self._state.revision
        wrote = False

        def change(current: Stored | None) -> Write | None:
            nonlocal wrote
            if (current.state.revision if current else 0) != expected:
                return None  # written by someone else meanwhile: adopt theirs instead
            wrote = True
            return Write(state=state, transitions=(transition,))

        try:
            stored = self._store.update(change)
        except StateError as exc:
            return self._save_failed(exc, state, decision, transition)
        self.store_error = None
        if not wrote:
            if stored is not None:
                self._adopt(stored, "changed by another writer")
            return False
        assert stored is not None
        self._version = stored.version  # what we wrote under the lock: any later write differs
        self._apply(stored.state, transition, decision.new_stage, move=move)
        return True

    def _apply(
        self, state: RolloutState, transition: Transition, new_stage: bool, *, move: bool = True
    ) -> None:
        moved = state.weight != self._state.weight
        self._state = state
        self._history = [*self._history, transition][-STATUS_HISTORY:]
        if move and moved:
            self._split.set_weight(state.weight)
        if move:
            self._sync_shadow()
        if new_stage:
            self._new_stage()
        if transition.action == "rollback":
            self.rollbacks_total += 1
        level = "warning" if transition.trigger == "auto" and transition.action != "promote" else "info"
        getattr(self._log, level)("rollout_transition", **_log_fields(transition))

    def _save_failed(
        self, exc: StateError, state: RolloutState, decision: Decision, transition: Transition
    ) -> bool:
        """Not saved, so not applied — except a rollback, which protects users first."""
        self.store_error = str(exc)
        if isinstance(exc, StateCorrupt):
            self._refuse_store(exc)
            return False
        unsaved = transition.action == "rollback" and state.weight < self._state.weight
        self._log.error("rollout_state_not_saved", error=str(exc), action=transition.action, applied=unsaved)
        if unsaved:
            self._apply(state, transition, decision.new_stage)
        return unsaved

    def _refuse_store(self, exc: StateError, *, route: bool = True) -> None:
        """An unreadable state file: serve weight 0, keep the file, say why."""
        self.store_error = str(exc)
        self._store_corrupt = True
        moved = self._state.weight != 0
        reason = f"state store unreadable: {exc}"
        self._state = replace(self._state, state="rolled_back", weight=0, reason=reason)
        self._log.error("rollout_state_unreadable", error=str(exc), weight=0)
        if route and moved:
            self._split.set_weight(0)
            self._new_stage()
        if route:
            self._sync_shadow()

    def _adopt(self, stored: Stored, why: str, *, route: bool = True) -> None:
        before = self._state
        self._state, self._history = stored.state, list(stored.history[-STATUS_HISTORY:])
        self._store_corrupt, self.store_error = False, None
        self._version = stored.version
        moved = (before.weight, before.stage_started_at) != (stored.state.weight, stored.state.stage_started_at)
        if route and stored.state.state == "rolled_back" and before.state != "rolled_back":
            self.rollbacks_total += 1  # e.g. `canary rollback -c FILE` written beside us
        if route and moved:
            self._split.set_weight(stored.state.weight)
            self._new_stage()
        if route:
            self._sync_shadow()
        self._log.info(
            "rollout_state_adopted", why=why, state=stored.state.state, weight=stored.state.weight,
            revision=stored.state.revision,
        )

    def _check_external(self, now: float) -> None:
        """Pick up a change another writer (e.g. `canary rollback -c FILE`) stored."""
        version = self._store.version()
        if version == self._version:
            return
        self._version = version
        try:
            stored = self._store.load()
        except StateCorrupt as exc:
            if not self._store_corrupt:
                self._refuse_store(exc)
            return
        except StateError as exc:
            self.store_error = str(exc)
            return
        if stored is None:
            if self._store_corrupt:  # the operator removed the unreadable file
                self._store_corrupt, self.store_error = False, None
                self._first_start(now)
                self._split.set_weight(self._state.weight)
                self._sync_shadow()
            elif self._state.revision:
                self._resave()
            return
        if self._store_corrupt or stored.state.revision != self._state.revision:
            self._adopt(stored, "changed in the store")
            if not self._store_corrupt:
                self._apply_config(now)

    def _resave(self) -> None:
        """The state file vanished while running: write what we know again (the history
        is kept apart by the store). Someone else's write instead is adopted next tick."""
        snapshot = Write(state=self._state)
        try:
            stored = self._store.update(lambda current: snapshot if current is None else None)
        except StateError as exc:
            self.store_error = str(exc)
            return
        if stored is not None and stored.state == replace(self._state, revision=stored.state.revision):
            self._state = stored.state  # ours, with its new revision
        self._version = _UNKNOWN

    def _sync_shadow(self) -> None:
        self._split.set_shadow(self._state.state == "shadow")

    def _new_stage(self) -> None:
        self._recorder.reset_stage()
        self._analysis = AnalysisState()
        self._evidence = _EMPTY

    def _with_window(self, transition: Transition) -> Transition:
        """Add both arms' window figures (p50/p95/p99) to the evidence of a transition."""
        snapshots = self._recorder.snapshot(self._monotonic())
        window = {arm: _window_figures(snap) for arm, snap in snapshots.items()}
        return replace(transition, evidence={**transition.evidence, "window": window})

    def _record_series(self, now: float) -> None:
        mono = self._monotonic()
        if mono < self._series_due:
            return
        self._series_due = mono + self._series_step
        snapshots = self._recorder.snapshot(mono)
        point: dict[str, Any] = {"t": round(now, 3), "weight": self._state.weight}
        for arm in ARMS:
            point[arm] = {"error_rate": round(snapshots[arm].error_rate, 5), "p95": snapshots[arm].p95}
        self._series.append(point)


def _window_figures(snap: ArmSnapshot) -> dict[str, Any]:
    return {
        "requests": snap.requests, "errors": snap.errors, "error_rate": round(snap.error_rate, 5),
        "p50": snap.p50, "p95": snap.p95, "p99": snap.p99,
    }


def _arm_status(snap: ArmSnapshot) -> dict[str, Any]:
    """Window figures (error rate, percentiles) plus the counts the tests judge."""
    stage = snap.stage
    return {
        **_window_figures(snap),
        "inflight": snap.inflight,
        "stage": {
            "requests": stage.requests, "errors": stage.errors,
            "slow_warning": stage.slow_warning, "slow_critical": stage.slow_critical,
        },
    }


def _log_fields(transition: Transition) -> dict[str, Any]:
    data = transition.to_json()
    data.pop("at")
    return data

