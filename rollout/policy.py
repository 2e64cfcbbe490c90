"""What the engine judges with: the policy (settings turned into numbers and the plan of
sequential tests) and the evidence (both arms' counts since the stage started).

Values only; `rollout.engine` decides with them and `rollout.verdict` explains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from config.settings import Action, AnalysisSettings, RolloutSettings
from rollout.evidence import StageCounts
from rollout.sprt import AnalysisPlan
from rollout.state import Severity

__all__ = ["Evidence", "Policy"]


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What the rollout and analysis settings mean to the engine."""

    stages: tuple[int, ...] = (5, 25, 50, 100)
    bake: float = 600.0
    shadow: float = 0.0  # > 0: mirrored traffic only, this long, before the first stage
    min_requests: int = 100
    auto_promote: bool = True
    analysis_min_requests: int = 20
    error_warning: float = 0.05
    error_critical: float = 0.10
    p95_limit: float = 5.0
    p99_limit: float = 10.0
    on_warning: Action = "step_back"
    on_critical: Action = "rollback"
    compare_baseline: bool = True
    alpha: float = 0.01
    beta: float = 0.05  # level of the confidence sequences behind promotion
    p95_ratio: float = 1.5  # latency regression against the baseline; 0: off
    min_delta: float = 0.05
    compare_alpha: float = 1e-5
    plan: AnalysisPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.stages or list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"stages must be increasing, got {self.stages}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        plan = AnalysisPlan.build(
            error_warning=self.error_warning,
            error_critical=self.error_critical,
            alpha=self.alpha,
            compare_alpha=self.compare_alpha,
            p95_ratio=self.p95_ratio,
            min_delta=self.min_delta,
        )
        object.__setattr__(self, "plan", plan)

    @classmethod
    def from_settings(cls, rollout: RolloutSettings, analysis: AnalysisSettings) -> Policy:
        return cls(
            stages=tuple(rollout.stages),
            bake=rollout.bake,
            shadow=rollout.shadow,
            min_requests=rollout.min_requests,
            auto_promote=rollout.auto_promote,
            analysis_min_requests=analysis.min_requests,
            error_warning=analysis.errors.warning,
            error_critical=analysis.errors.critical,
            p95_limit=analysis.latency.p95_warning,
            p99_limit=analysis.latency.p99_critical,
            on_warning=analysis.on_warning,
            on_critical=analysis.on_critical,
            compare_baseline=analysis.compare_baseline,
            beta=analysis.beta,
            p95_ratio=analysis.latency.regression.p95_ratio,
            min_delta=analysis.latency.regression.min_delta,
        )

    def bake_for(self, state: str) -> float:
        """The time a stage must last before promotion; the shadow stage lasts `shadow`."""
        return self.shadow if state == "shadow" else self.bake

    def next_stage(self, weight: int) -> int | None:
        return next((stage for stage in self.stages if stage > weight), None)

    def previous_stage(self, weight: int) -> int:
        return max((stage for stage in self.stages if stage < weight), default=0)

    def action_for(self, severity: Severity) -> Action:
        return self.on_critical if severity == "critical" else self.on_warning


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """Both arms' outcomes since the current stage started."""

    canary: StageCounts
    baseline: StageCounts
