"""The sequential tests' building blocks: the Bernoulli SPRT of a rate, the conditional
binomial SPRT of the canary's share of bad outcomes, and the floored score (CUSUM) with
its latch. `rollout.sprt` explains why they are sound under continuous checking."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import log

__all__ = ["CEILING", "RateTest", "ShareTest", "alpha_threshold", "cusum"]

CEILING = 2.0  # a score never exceeds CEILING x its threshold


def alpha_threshold(alpha: float) -> float:
    """The score a test must reach so a fresh start alarms with probability <= alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return log(1.0 / alpha)


def cusum(value: float, is_open: bool, llr: float, threshold: float) -> tuple[float, bool]:
    """Add one tick's log-likelihood ratio to a score floored at 0. The alarm latches
    from the threshold until the score is back at 0, i.e. until the evidence of health
    outweighs it; the score is capped at twice the threshold so that takes as long after
    an hour-long outage as after a minute-long one."""
    value += llr
    if value <= 0.0:
        return 0.0, False
    return min(value, CEILING * threshold), is_open or value >= threshold


@dataclass(frozen=True, kw_only=True)
class RateTest:
    """One-sided Bernoulli SPRT of H0: rate = p0 against H1: rate = p1 (> p0)."""

    p0: float
    p1: float
    threshold: float
    _up: float = field(init=False, repr=False, compare=False)
    _down: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.p0 < self.p1 < 1.0:
            raise ValueError(f"need 0 < p0 < p1 < 1, got p0={self.p0} p1={self.p1}")
        object.__setattr__(self, "_up", log(self.p1 / self.p0))
        object.__setattr__(self, "_down", log((1.0 - self.p1) / (1.0 - self.p0)))

    @classmethod
    def for_threshold(cls, p0: float, *, ratio: float, threshold: float) -> RateTest:
        """H1 at `ratio` times the threshold, kept below 1 for thresholds near it."""
        return cls(p0=p0, p1=min(p0 * ratio, (1.0 + p0) / 2.0), threshold=threshold)

    def llr(self, trials: int, events: int) -> float:
        """The log-likelihood ratio of `events` bad outcomes among `trials` new ones."""
        return events * self._up + (trials - events) * self._down


@dataclass(frozen=True, kw_only=True)
class ShareTest:
    """Conditional binomial SPRT: is the canary's bad-outcome rate `ratio` times the
    baseline's (H1) rather than equal to it (H0)?"""

    ratio: float
    threshold: float

    def __post_init__(self) -> None:
        if self.ratio <= 1.0:
            raise ValueError(f"ratio must be > 1, got {self.ratio}")

    def llr(self, share: float, canary_events: int, baseline_events: int) -> float:
        """Log-likelihood ratio of new bad outcomes of each arm, the canary taking `share`
        of the requests (the stage's share so far: steady within a stage, and meaningful
        even when a short tick saw requests of one arm only)."""
        if not 0.0 < share < 1.0 or not (canary_events or baseline_events):
            return 0.0
        worse = self.worse_share(share)
        return canary_events * log(worse / share) + baseline_events * log(
            (1.0 - worse) / (1.0 - share)
        )

    def worse_share(self, share: float) -> float:
        """The canary's share of bad outcomes under H1, for a request share `share`."""
        return self.ratio * share / (self.ratio * share + 1.0 - share)
