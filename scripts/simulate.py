#!/usr/bin/env python3
"""Run the real rollout engine (`rollout.engine.decide`) on synthetic request streams.

Each simulated stage ticks once per `analysis.interval` (1 s); per tick both arms' request
counts are Poisson and their error counts binomial, drawn from a seeded stdlib RNG, and
fed to `decide` as cumulative stage counts exactly as the controller does. It reports:

* false step-backs / rollbacks of a healthy canary (1% errors, baseline 1%),
* false actions when both arms suffer the same error bursts (a shared outage),
* time to rollback of a canary at 20% errors (baseline 1%), median and p90,

and prints a markdown table. Usage: `python scripts/simulate.py [--seeds-scale X] [--seed N]`.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rollout.engine import Evidence, Policy, decide  # noqa: E402
from rollout.evidence import StageCounts  # noqa: E402
from rollout.sprt import AnalysisState  # noqa: E402
from rollout.state import RolloutState  # noqa: E402

__all__ = ["Burst", "Result", "Traffic", "binomial", "main", "poisson", "run_all", "run_stage"]

STAGE = 600.0  # a 10-minute stage
Row = tuple[str, str, str]


@dataclass(frozen=True, kw_only=True)
class Burst:
    """A period in which both arms fail at `error_rate` (a shared dependency's outage)."""

    start: float
    duration: float
    error_rate: float


@dataclass(frozen=True, kw_only=True)
class Traffic:
    rate: float  # requests per second over both arms
    canary_errors: float
    baseline_errors: float
    bursts: tuple[Burst, ...] = ()
    regression_at: float = 0.0  # the canary is like the baseline until then

    def error_rates(self, t: float) -> tuple[float, float]:
        canary = self.canary_errors if t >= self.regression_at else self.baseline_errors
        for burst in self.bursts:
            if burst.start <= t < burst.start + burst.duration:
                return max(burst.error_rate, canary), burst.error_rate
        return canary, self.baseline_errors


@dataclass(frozen=True, kw_only=True)
class Result:
    action: str | None  # the first automatic action other than a promotion
    at: float | None
    rollback_at: float | None  # when the canary was rolled back, if it was


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, product, count = math.exp(-mean), rng.random(), 0
    while product > limit:
        product *= rng.random()
        count += 1
    return count


def binomial(rng: random.Random, n: int, p: float) -> int:
    """Successes among n trials, by skipping geometric gaps: O(n*p) draws."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    log_q = math.log1p(-p)
    position, successes = 0, 0
    while True:
        position += int(math.log(1.0 - rng.random()) / log_q) + 1
        if position > n:
            return successes
        successes += 1


def run_stage(
    traffic: Traffic, policy: Policy, rng: random.Random, *, weight: int, duration: float,
    interval: float = 1.0,
) -> Result:
    """Tick one rollout from `weight` for `duration` seconds or until it is rolled back,
    promoted or at weight 0; a step back or pause goes on as the engine says."""
    state = RolloutState(state="progressing", weight=weight, stage_started_at=0.0)
    analysis = AnalysisState()
    canary, baseline = [0, 0], [0, 0]
    first: tuple[str, float] | None = None
    t = 0.0
    while t < duration and state.weight:
        t += interval
        share = state.weight / 100.0
        canary_rate, baseline_rate = traffic.error_rates(t)
        n_canary = poisson(rng, traffic.rate * share * interval)
        n_baseline = poisson(rng, traffic.rate * (1.0 - share) * interval)
        canary[0] += n_canary
        canary[1] += binomial(rng, n_canary, canary_rate)
        baseline[0] += n_baseline
        baseline[1] += binomial(rng, n_baseline, baseline_rate)
        evidence = Evidence(
            canary=StageCounts(requests=canary[0], errors=canary[1]),
            baseline=StageCounts(requests=baseline[0], errors=baseline[1]),
        )
        state, analysis, decision = decide(state, analysis, evidence, policy, t)
        if decision is None:
            continue
        action = decision.transition.action
        if action == "promote":
            break
        first = first or (action, t)
        if action == "rollback":
            return Result(action=first[0], at=first[1], rollback_at=t)
        if decision.new_stage:
            canary, baseline = [0, 0], [0, 0]
    return Result(action=first[0] if first else None, at=first[1] if first else None, rollback_at=None)


Make = Callable[[random.Random], Traffic]


def _first_actions(make: Make, policy: Policy, runs: int, weight: int, seed: int) -> Counter[str | None]:
    """The first automatic action (None: none) of `runs` ten-minute stages."""
    rng = random.Random(seed)
    results = (run_stage(make(rng), policy, rng, weight=weight, duration=STAGE) for _ in range(runs))
    return Counter(result.action for result in results)


def _bursty(rate: float) -> Make:
    """Three 30-second bursts at 50% errors on both arms, at random times in the stage."""

    def make(rng: random.Random) -> Traffic:
        starts = sorted(rng.uniform(0, STAGE - 30) for _ in range(3))
        bursts = tuple(Burst(start=s, duration=30.0, error_rate=0.5) for s in starts)
        return Traffic(rate=rate, canary_errors=0.01, baseline_errors=0.01, bursts=bursts)

    return make


def _steady(rate: float, canary: float, baseline: float = 0.01) -> Make:
    return lambda _rng: Traffic(rate=rate, canary_errors=canary, baseline_errors=baseline)


def _time_to_rollback(traffic: Traffic, weight: int, policy: Policy, runs: int, seed: int) -> list[float | None]:
    """Seconds from the regression's start to the rollback (None: not rolled back)."""
    rng = random.Random(seed)
    results = (run_stage(traffic, policy, rng, weight=weight, duration=3600.0) for _ in range(runs))
    return [None if r.rollback_at is None else r.rollback_at - traffic.regression_at for r in results]


def _quantile(values: list[float | None], q: float) -> str:
    ranked = sorted(v if v is not None else math.inf for v in values)
    value = ranked[min(len(ranked) - 1, int(q * len(ranked)))]
    return "never" if value == math.inf else f"{value:.0f} s"


def _tally(counts: Counter[str | None]) -> str:
    """How many stages had an automatic action, and which."""
    runs = sum(counts.values())
    acted = {action: n for action, n in counts.items() if action not in (None, "promote")}
    total = sum(acted.values())
    detail = ", ".join(f"{n} {action}" for action, n in sorted(acted.items()))
    return f"{total} ({total / runs:.2%})" + (f" — {detail}" if detail else "")


# (label, traffic, policy change, weight, stages, target)
ALARM_SCENARIOS: tuple[tuple[str, Make, dict[str, bool], int, int, str], ...] = (
    ("healthy canary (1% errors, baseline 1%), 10 req/s, 5% share", _steady(10, 0.01), {}, 5, 1000, "0"),
    ("healthy canary, 100 req/s, 25% share", _steady(100, 0.01), {}, 25, 200, "0"),
    ("healthy canary, no baseline gate (compare_baseline: false), 100 req/s, 25% share",
     _steady(100, 0.01), {"compare_baseline": False}, 25, 200, "0"),
    ("canary at 4% errors (0.8 x errors.warning), no baseline gate, 100 req/s, 25% share",
     _steady(100, 0.04), {"compare_baseline": False}, 25, 200, "(alarm rate below H0)"),
    ("canary exactly at errors.warning (5%), no baseline gate, 10 req/s, 5% share",
     _steady(10, 0.05), {"compare_baseline": False}, 5, 200, "(alarm rate at H0)"),
    ("canary exactly at errors.warning (5%), no baseline gate, 100 req/s, 25% share",
     _steady(100, 0.05), {"compare_baseline": False}, 25, 200, "(alarm rate at H0)"),
    ("shared bursts (3 x 30 s at 50% errors on both arms), 100 req/s, 5% share", _bursty(100), {}, 5, 300, "< 1%"),
    ("shared bursts (3 x 30 s at 50% errors on both arms), 100 req/s, 25% share", _bursty(100), {}, 25, 300, "< 1%"),
)


def _alarm_rows(scale: float, seed: int) -> list[Row]:
    rows = []
    for index, (label, make, change, weight, stages, target) in enumerate(ALARM_SCENARIOS):
        runs = max(1, int(stages * scale))
        counts = _first_actions(make, Policy(**change), runs, weight, seed * 1000 + index)
        rows.append((f"{label}: {runs} ten-minute stages", _tally(counts), target))
    return rows


def _detection_rows(scale: float, seed: int) -> list[Row]:
    runs = max(1, int(200 * scale))
    rows = []
    for index, (rate, weight) in enumerate(((10, 5), (10, 25), (100, 5), (100, 25))):
        traffic = Traffic(rate=rate, canary_errors=0.20, baseline_errors=0.01)
        times = _time_to_rollback(traffic, weight, Policy(), runs, seed * 1000 + 100 + index)
        rolled = sum(t is not None for t in times)
        rows.append((
            f"canary at 20% errors (baseline 1%), {rate} req/s, {weight}% share: {runs} runs",
            f"rolled back {rolled}/{runs}; median {_quantile(times, 0.5)}, p90 {_quantile(times, 0.9)}",
            "p90 < 60 s" if (rate, weight) == (100, 5) else "",
        ))
    late = Traffic(rate=100, canary_errors=0.20, baseline_errors=0.01, regression_at=300.0)
    times = _time_to_rollback(late, 5, Policy(), runs, seed * 1000 + 200)
    rows.append((
        f"late regression: healthy for 300 s, then 20% errors, 100 req/s, 5% share: {runs} runs",
        f"median {_quantile(times, 0.5)}, p90 {_quantile(times, 0.9)} after it starts", "as early ones",
    ))
    counts = _first_actions(_steady(100, 0.085), Policy(), runs, 25, seed * 1000 + 300)
    rows.append((
        f"canary at 8.5% errors (warning level), 100 req/s, 25% share: {runs} stages",
        ", ".join(f"{action} {n}" for action, n in sorted(counts.items(), key=str)), "step_back",
    ))
    return rows


def run_all(*, scale: float = 1.0, seed: int = 1) -> list[Row]:
    """All scenarios; rows of (scenario, result, target)."""
    return _alarm_rows(scale, seed) + _detection_rows(scale, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds-scale", type=float, default=1.0, help="multiply every seed count")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = run_all(scale=args.seeds_scale, seed=args.seed)
    print("| scenario | result | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    policy = Policy()
    print(
        f"\n{time.perf_counter() - started:.0f} s; default policy: alpha {policy.alpha:g} per test, "
        f"comparison alpha {policy.compare_alpha:g}, analysis.min_requests {policy.analysis_min_requests}, "
        f"ticks of 1 s; `python scripts/simulate.py --seeds-scale {args.seeds_scale:g} --seed {args.seed}`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
