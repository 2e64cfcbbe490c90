"""What a demo run is asked for (`DemoOptions`) and how fast its story goes (`Pace`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXIT_INTERRUPTED", "FAST", "NORMAL", "DemoOptions", "Pace"]

EXIT_INTERRUPTED = 130


@dataclass(frozen=True, kw_only=True)
class Pace:
    """How fast the story runs: the rollout and analysis timings, the simulated latency."""

    bake: str
    shadow: str  # with --protect: the shadow stage before the first live stage
    interval: str
    window: str
    min_requests: int  # rollout.min_requests
    analysis_min_requests: int
    p95_warning: str
    p99_critical: str
    first_token: tuple[float, float]
    per_token: tuple[float, float]
    tokens: tuple[int, int]
    legacy_workers: int
    concurrency: int
    think: tuple[float, float]
    time_limit: float


FAST = Pace(
    bake="2s", shadow="3s", interval="100ms", window="10s", min_requests=40, analysis_min_requests=20,
    p95_warning="1s", p99_critical="2s", first_token=(0.02, 0.08), per_token=(0.002, 0.006),
    tokens=(2, 6), legacy_workers=64, concurrency=64, think=(0.0, 0.02), time_limit=90.0,
)
NORMAL = Pace(
    bake="30s", shadow="30s", interval="1s", window="30s", min_requests=100, analysis_min_requests=20,
    p95_warning="5s", p99_critical="10s", first_token=(0.05, 0.30), per_token=(0.010, 0.030),
    tokens=(20, 80), legacy_workers=48, concurrency=64, think=(0.0, 0.5), time_limit=900.0,
)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    canary_error_rate: float = 0.0
    canary_latency: float = 0.0
    seed: int = 0
    fast: bool = False
    keep_running: bool = False
    protect: bool = False  # a shadow stage and fallback to the baseline (CONTRACT §8)
    time_limit: float | None = None
    replicas: int = 1  # >1: that many proxies share one rollout through a demo Redis (CONTRACT §7)

    @property
    def pace(self) -> Pace:
        return FAST if self.fast else NORMAL
