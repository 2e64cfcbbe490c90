"""Anytime-valid confidence sequences for a rate: what a stage's cumulative counts say the
canary's true rate is, valid however often they are looked at.

For a claimed rate p, each alternative q (odds(q) = c x odds(p)) gives a likelihood ratio
L(q)/L(p) = c^k / (1 - p + c p)^n after k bad outcomes in n; under rate p it is a
martingale, and so is any weighted mean of them (a mixture of SPRTs). By Ville's
inequality the mixture ever reaches 1/beta with probability at most beta, so a rate p
whose mixture did reach it is excluded, at every moment at once. Alternatives below p
(c < 1) give the upper bound, alternatives above (1/c) the lower bound; each bound is a
one-sided level-beta confidence sequence. The mixture over alternatives below p is
increasing in p above the observed rate, so "the upper bound is below the threshold" is
the same as "the mixture at the threshold reached 1/beta": `shown_below` checks exactly
that, cheaply, every tick; `bounds` finds the bounds themselves for display.

References: Robbins (1970) mixtures; Howard, Ramdas, McAuliffe & Sekhon (2021), Annals of
Statistics 49(2); Lindon & Malek, "Anytime-valid inference for multinomial count data"
(Netflix, arXiv 2205.14762). Pure arithmetic on counts: counts of several processes sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import exp, log, log1p

__all__ = ["ODDS_RATIOS", "RateBounds", "bounds", "log_mixture", "shown_above", "shown_below"]

# odds ratios of the alternatives (equal weights): from "almost never" (0 bad outcomes,
# a healthy canary) to "just below" (a canary at 0.8-0.9 x a threshold)
ODDS_RATIOS: tuple[float, ...] = (0.02, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)
_BISECTIONS = 40
_EDGE_LOW, _EDGE_HIGH = 1e-9, 1.0 - 1e-9


def log_mixture(trials: int, events: int, rate: float, *, below: bool) -> float:
    """Log of the mixture likelihood ratio against `rate` after `events` bad outcomes in
    `trials`: of alternatives below `rate` (`below`) or above it."""
    if trials <= 0 or not 0.0 < rate < 1.0:
        return 0.0
    terms = []
    for ratio in ODDS_RATIOS:
        c = ratio if below else 1.0 / ratio
        terms.append(events * log(c) - trials * log1p(rate * (c - 1.0)))
    top = max(terms)
    return top + log(sum(exp(term - top) for term in terms) / len(terms))


def shown_below(trials: int, events: int, threshold: float, beta: float) -> bool:
    """Is the rate's upper confidence bound (level beta) below `threshold`?"""
    return log_mixture(trials, events, threshold, below=True) >= log(1.0 / beta)


def shown_above(trials: int, events: int, threshold: float, beta: float) -> bool:
    """Is the rate's lower confidence bound (level beta) above `threshold`?"""
    return log_mixture(trials, events, threshold, below=False) >= log(1.0 / beta)


@dataclass(frozen=True, kw_only=True)
class RateBounds:
    """A rate's estimate and its anytime-valid interval (each side at level beta)."""

    estimate: float
    lower: float
    upper: float

    def to_json(self) -> dict[str, object]:
        return {"estimate": round(self.estimate, 5), "ci": [round(self.lower, 5), round(self.upper, 5)]}


def bounds(trials: int, events: int, beta: float) -> RateBounds | None:
    """The confidence sequence at these counts; None without a single observation."""
    if trials <= 0:
        return None
    observed = events / trials
    upper = _crossing(trials, events, beta, observed, 1.0, below=True)
    lower = _crossing(trials, events, beta, 0.0, observed, below=False)
    return RateBounds(estimate=observed, lower=lower, upper=upper)


def _crossing(trials: int, events: int, beta: float, low: float, high: float, *, below: bool) -> float:
    """Bisect for the rate where the mixture reaches 1/beta: rates beyond it are excluded.
    Returns the excluded side of the final bracket, so the interval errs wide."""
    level = log(1.0 / beta)
    inside, outside = (low, min(high, _EDGE_HIGH)) if below else (high, max(low, _EDGE_LOW))
    if log_mixture(trials, events, outside, below=below) < level:
        return 1.0 if below else 0.0
    for _ in range(_BISECTIONS):
        middle = (inside + outside) / 2.0
        if log_mixture(trials, events, middle, below=below) >= level:
            outside = middle
        else:
            inside = middle
    return outside
