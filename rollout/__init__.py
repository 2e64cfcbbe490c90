"""The rollout: judge the canary from recorded outcomes, decide, persist, move traffic.

    evidence    per-arm outcome counters the proxy records (hot path)
    sprt        sequential tests on count deltas (pure)
    policy      Policy (settings as numbers, the test plan) and Evidence values
    verdict     scores -> level, reasons, figures (pure)
    engine      (state, evidence, policy, now) -> (state, decision); operator commands (pure)
    state       RolloutState / Transition values and their JSON
    store       StateStore interface, JsonFileStore (atomic, locked)
    controller  the effectful shell: tick, save, set_weight, log, status
"""

from __future__ import annotations

from rollout.controller import RolloutController, TrafficSplit, record_offline_rollback
from rollout.engine import Decision, Evidence, Policy, decide
from rollout.evidence import ArmSnapshot, OutcomeRecorder, StageCounts
from rollout.sprt import AnalysisState
from rollout.state import STATES, RolloutState, Transition
from rollout.store import JsonFileStore, StateStore, Stored
from rollout.verdict import Verdict

__all__ = [
    "STATES",
    "AnalysisState",
    "ArmSnapshot",
    "Decision",
    "Evidence",
    "JsonFileStore",
    "OutcomeRecorder",
    "Policy",
    "RolloutController",
    "RolloutState",
    "StageCounts",
    "StateStore",
    "Stored",
    "TrafficSplit",
    "Transition",
    "Verdict",
    "decide",
    "record_offline_rollback",
]
