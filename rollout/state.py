"""The persisted rollout values: where the rollout is, and how it got there.

Both are immutable and round-trip through JSON (`to_json` / `from_json`), which is the
state store's file format. Times are wall-clock epoch seconds so a bake survives a
restart; in JSON a transition's `at` is ISO 8601 (CONTRACT §6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, get_args

__all__ = [
    "LEVELS",
    "STATES",
    "TRIGGERS",
    "Level",
    "RolloutState",
    "Severity",
    "State",
    "Transition",
    "Trigger",
    "from_iso",
    "stage_number",
    "to_iso",
]

State = Literal["shadow", "progressing", "paused", "manual", "rolled_back", "promoted"]
Trigger = Literal["auto", "operator", "config"]
Level = Literal["insufficient_data", "inconclusive", "ok", "warning", "critical"]
Severity = Literal["warning", "critical"]
STATES: tuple[State, ...] = get_args(State)
TRIGGERS: tuple[Trigger, ...] = get_args(Trigger)
LEVELS: tuple[Level, ...] = get_args(Level)
_LATCHES = (None, "warning", "critical")


def to_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="microseconds")


def from_iso(text: str) -> float:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def stage_number(weight: int, stages: tuple[int, ...]) -> int | None:
    """The 1-based position of `weight` in the plan; None at 0 or at a pinned weight."""
    return stages.index(weight) + 1 if weight in stages else None


@dataclass(frozen=True, kw_only=True)
class RolloutState:
    """Where the rollout stands. `latched` is the level of the automatic action that put
    it on hold (only a higher level may act again until an operator steps in);
    `config_weight` is the `rollout.weight` last applied, so an unchanged config never
    re-applies it; `revision` counts saves, so an external change can be noticed."""

    state: State
    weight: int
    stage_started_at: float
    reason: str = ""
    latched: Literal["warning", "critical"] | None = None
    config_weight: int | None = None
    revision: int = 0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown rollout state {self.state!r}")
        if not 0 <= self.weight <= 100:
            raise ValueError(f"weight must be 0..100, got {self.weight}")
        if self.latched not in _LATCHES:
            raise ValueError(f"unknown latch {self.latched!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "weight": self.weight,
            "stage_started_at": to_iso(self.stage_started_at),
            "reason": self.reason,
            "latched": self.latched,
            "config_weight": self.config_weight,
            "revision": self.revision,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        """Parse a stored state; raises ValueError/TypeError/KeyError when malformed."""
        return cls(
            state=_typed(data["state"], str, "state"),
            weight=_typed(data["weight"], int, "weight"),
            stage_started_at=from_iso(_typed(data["stage_started_at"], str, "stage_started_at")),
            reason=_typed(data.get("reason", ""), str, "reason"),
            latched=data.get("latched"),
            config_weight=_optional_int(data.get("config_weight"), "config_weight"),
            revision=_typed(data.get("revision", 0), int, "revision"),
        )


@dataclass(frozen=True, kw_only=True)
class Transition:
    """One step of the rollout, as written to the history and logged."""

    at: float
    action: str
    trigger: Trigger
    from_state: State
    state: State
    from_weight: int
    weight: int
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": to_iso(self.at),
            "action": self.action,
            "trigger": self.trigger,
            "from_state": self.from_state,
            "state": self.state,
            "from_weight": self.from_weight,
            "weight": self.weight,
            "reason": self.reason,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Transition:
        trigger = _typed(data["trigger"], str, "trigger")
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}")
        states = [_typed(data[key], str, key) for key in ("from_state", "state")]
        if any(s not in STATES for s in states):
            raise ValueError(f"unknown state in {states}")
        return cls(
            at=from_iso(_typed(data["at"], str, "at")),
            action=_typed(data["action"], str, "action"),
            trigger=trigger,  # type: ignore[arg-type]
            from_state=states[0],  # type: ignore[arg-type]
            state=states[1],  # type: ignore[arg-type]
            from_weight=_typed(data["from_weight"], int, "from_weight"),
            weight=_typed(data["weight"], int, "weight"),
            reason=_typed(data.get("reason", ""), str, "reason"),
            evidence=_typed(data.get("evidence", {}), dict, "evidence"),
        )


def _typed(value: Any, kind: type, key: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _optional_int(value: Any, key: str) -> int | None:
    return None if value is None else _typed(value, int, key)
