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

from rollout.confidence import shown_below  # noqa: E402
from rollout.engine import Evidence, Policy, decide  # noqa: E402
from rollout.evidence import STAGE_LATENCY_EDGES, StageCounts, stage_latency_bin  # noqa: E402
from rollout.sprt import AnalysisState  # noqa: E402
from rollout.state import RolloutState  # noqa: E402
from rollout.verdict import assess  # noqa: E402

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
class Latency:
    """Lognormal latencies (median 100 ms, sigma 0.5: p95 ~ 230 ms, far under the absolute
    limits); the canary's are `canary_scale` times the baseline's; `spikes` multiply both
    arms' latencies by `factor` during (start, start + duration)."""

    canary_scale: float = 1.0
    spikes: tuple[tuple[float, float], ...] = ()  # (start, duration)
    factor: float = 5.0
    median: float = 0.1
    sigma: float = 0.5

    def scale(self, t: float) -> float:
        return self.factor if any(start <= t < start + d for start, d in self.spikes) else 1.0


@dataclass(frozen=True, kw_only=True)
class Traffic:
    rate: float  # requests per second over both arms
    canary_errors: float
    baseline_errors: float
    bursts: tuple[Burst, ...] = ()
    regression_at: float = 0.0  # the canary is like the baseline until then
    latency: Latency | None = None  # None: latencies are not simulated

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
    promoted_at: float | None = None
    promoted_after: int | None = None  # canary requests at the stage when promoted
    ok_after_alarm: bool = False  # the verdict read `ok` after it first read warning/critical


class Arm:
    """One arm's cumulative stage counts (and latency histogram, when simulated)."""

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.bins: list[int] | None = None

    def add(self, rng: random.Random, n: int, error_rate: float, latency: tuple[float, float] | None) -> None:
        self.requests += n
        self.errors += binomial(rng, n, error_rate)
        if latency is not None:
            bins = self.bins = self.bins or [0] * (len(STAGE_LATENCY_EDGES) + 1)
            mu, sigma = latency
            for _ in range(n):
                bins[stage_latency_bin(rng.lognormvariate(mu, sigma))] += 1

    def counts(self) -> StageCounts:
        bins = tuple(self.bins) if self.bins else ()
        return StageCounts(requests=self.requests, errors=self.errors, latency_bins=bins)


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
    interval: float = 1.0, watch_verdict: bool = False,
) -> Result:
    """Tick one rollout from `weight` for `duration` seconds or until it is rolled back,
    promoted or at weight 0; a step back or pause goes on as the engine says.
    `watch_verdict`: also take the verdict level every tick (slower)."""
    state = RolloutState(state="progressing", weight=weight, stage_started_at=0.0)
    analysis = AnalysisState()
    canary, baseline = Arm(), Arm()
    first: tuple[str, float] | None = None
    alarmed = ok_after_alarm = False
    t = 0.0
    while t < duration and state.weight:
        t += interval
        share = state.weight / 100.0
        canary_rate, baseline_rate = traffic.error_rates(t)
        latency = traffic.latency
        mu = math.log(latency.median * latency.scale(t)) if latency else 0.0
        n_canary = poisson(rng, traffic.rate * share * interval)
        n_baseline = poisson(rng, traffic.rate * (1.0 - share) * interval)
        canary.add(rng, n_canary, canary_rate, (mu + math.log(latency.canary_scale), latency.sigma) if latency else None)
        baseline.add(rng, n_baseline, baseline_rate, (mu, latency.sigma) if latency else None)
        evidence = Evidence(canary=canary.counts(), baseline=baseline.counts())
        weight_now = state.weight
        state, analysis, decision = decide(state, analysis, evidence, policy, t)
        if watch_verdict and (decision is None or not decision.new_stage):
            level, _ = assess(analysis, evidence, policy, weight_now)
            ok_after_alarm = ok_after_alarm or (alarmed and level == "ok")
            alarmed = alarmed or level in ("warning", "critical")
        if decision is None:
            continue
        action = decision.transition.action
        if action == "promote":
            return Result(
                action=first[0] if first else None, at=first[1] if first else None, rollback_at=None,
                promoted_at=t, promoted_after=evidence.canary.requests, ok_after_alarm=ok_after_alarm,
            )
        first = first or (action, t)
        if action == "rollback":
            return Result(action=first[0], at=first[1], rollback_at=t, ok_after_alarm=ok_after_alarm)
        if decision.new_stage:
            canary, baseline = Arm(), Arm()
            if watch_verdict:
                break  # the stage ended at its first action
    return Result(
        action=first[0] if first else None, at=first[1] if first else None, rollback_at=None,
        ok_after_alarm=ok_after_alarm,
    )


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


# -- the table of issue 12: evidence of health, verdicts, latency against the baseline ------


def _runs(make: Make, policy: Policy, runs: int, seed: int, *, weight: int, duration: float = STAGE,
          watch_verdict: bool = False) -> list[Result]:
    rng = random.Random(seed)
    return [
        run_stage(make(rng), policy, rng, weight=weight, duration=duration, watch_verdict=watch_verdict)
        for _ in range(runs)
    ]


def _outcomes(results: list[Result]) -> str:
    """promoted / stepped back / rolled back / still waiting, of a list of stages."""
    promoted = sum(r.promoted_at is not None for r in results)
    acted = Counter(r.action for r in results if r.action)
    waiting = sum(r.promoted_at is None and r.action is None for r in results)
    parts = [f"promoted {promoted}/{len(results)}"] + [f"{n} {action}" for action, n in sorted(acted.items())]
    return ", ".join(parts + [f"{waiting} still waiting"])


def _gate_alone(runs: int, seed: int, rate: float = 0.05) -> int:
    """Stages (100 req/s, 25% share, 600 s) in which the errors' upper bound ever dipped
    under errors.warning: the promotion gate alone, without the detectors' step backs."""
    rng, beta, dipped = random.Random(seed), Policy().beta, 0
    for _ in range(runs):
        n = k = 0
        for _tick in range(int(STAGE)):
            new = poisson(rng, 25.0)
            n, k = n + new, k + binomial(rng, new, rate)
            if n >= 100 and shown_below(n, k, 0.05, beta):
                dipped += 1
                break
    return dipped


def _latency(scale: float, spikes: int = 0) -> Make:
    def make(rng: random.Random) -> Traffic:
        starts = tuple(sorted((rng.uniform(0, STAGE - 30), 30.0) for _ in range(spikes)))
        latency = Latency(canary_scale=scale, spikes=starts)
        return Traffic(rate=100, canary_errors=0.01, baseline_errors=0.01, latency=latency)
    return make


def _seconds(values: list[float], q: float) -> str:
    return _quantile(list(values), q) if values else "-"


def issue_rows(scale: float, seed: int) -> list[Row]:
    """The rows of issue 12's table, in its order."""
    n = lambda count: max(2, int(count * scale))  # noqa: E731
    rows: list[Row] = []
    healthy = _first_actions(_steady(10, 0.01), Policy(), n(1000), 5, seed * 1000 + 1)
    rows.append((f"healthy canary 1% errors (baseline 1%), 10 req/s, 5% share: {n(1000)} ten-minute stages",
                 f"false alarms {_tally(healthy)}", "0"))
    between = _runs(_steady(100, 0.075), Policy(), n(200), seed * 1000 + 2, weight=25, duration=1800.0)
    rows.append((f"canary at 7.5% errors, 100 req/s, 25% share: {n(200)} thirty-minute stages",
                 _outcomes(between), "never promoted"))
    anytime = Policy(bake=0.0)
    at = _runs(_steady(100, 0.05), anytime, n(200), seed * 1000 + 3, weight=25)
    dipped, gate_runs = _gate_alone(n(1000), seed * 1000 + 4), n(1000)
    rows.append((f"canary exactly at 5% errors, 100 req/s, 25% share, bake 0 (promotion possible at any tick): "
                 f"{n(200)} ten-minute stages",
                 f"{_outcomes(at)}; the gate alone (no detectors), 100 req/s, 25% share: upper bound under 5% "
                 f"in {dipped}/{gate_runs} stages ({dipped / gate_runs:.1%})",
                 "<= 5%"))
    near = _runs(_steady(100, 0.04), anytime, n(200), seed * 1000 + 5, weight=25, duration=3600.0)
    after = [float(r.promoted_after) for r in near if r.promoted_after is not None]
    rows.append((f"canary at 4% errors (0.8 x warning), 100 req/s, 25% share, bake 0: {n(200)} one-hour stages",
                 f"{_outcomes(near)}; canary requests needed: median {_count(after, 0.5)}, p90 {_count(after, 0.9)}",
                 "promoted; requests reported"))
    broken = Traffic(rate=100, canary_errors=0.20, baseline_errors=0.01)
    times = _time_to_rollback(broken, 5, Policy(), n(200), seed * 1000 + 6)
    rows.append((f"canary at 20% errors (baseline 1%), 100 req/s, 5% share: {n(200)} runs",
                 f"rolled back {sum(t is not None for t in times)}/{len(times)}; median {_quantile(times, 0.5)}, "
                 f"p90 {_quantile(times, 0.9)}", "p90 < 60 s"))
    rows.extend(_latency_rows(n, seed))
    steady = _runs(_steady(100, 0.08), Policy(on_warning="pause"), n(200), seed * 1000 + 10, weight=25,
                   watch_verdict=True)
    rows.append((f"verdict stability: canary steady at 8% errors, 100 req/s, 25% share (on_warning: pause, "
                 f"the stage goes on): {n(200)} ten-minute stages",
                 f"verdict read ok after the first alarm in {sum(r.ok_after_alarm for r in steady)} stages",
                 "0"))
    rows.extend(_extra_wait_rows(n, seed))
    return rows


def _latency_rows(n: Callable[[int], int], seed: int) -> list[Row]:
    rows: list[Row] = []
    for index, (label, make, target) in enumerate((
        ("canary p95 2x the baseline's (~230 ms vs ~460 ms, under the absolute limits)", _latency(2.0), ">= 95%, median < 120 s"),
        ("canary p95 1.1x the baseline's", _latency(1.1), "< 1%"),
        ("shared latency spike on both arms (3 x 30 s at 5x latency)", _latency(1.0, spikes=3), "< 1%"),
    )):
        results = _runs(make, Policy(), n(200), seed * 1000 + 7 + index, weight=25)
        flagged = [r.at for r in results if r.action is not None and r.at is not None]
        rows.append((
            f"{label}, 100 req/s, 25% share: {n(200)} ten-minute stages",
            f"flagged {len(flagged)}/{len(results)} ({len(flagged) / len(results):.1%}); "
            f"median {_seconds(flagged, 0.5)}, p90 {_seconds(flagged, 0.9)}",
            target,
        ))
    return rows


def _extra_wait_rows(n: Callable[[int], int], seed: int) -> list[Row]:
    """Healthy canaries: seconds from `today` (bake and rollout.min_requests met) to promotion."""
    rows: list[Row] = []
    policy = Policy()
    for index, (rate, weight) in enumerate(((10, 5), (100, 25), (100, 5))):
        results = _runs(_steady(rate, 0.01), policy, n(200), seed * 1000 + 11 + index, weight=weight,
                        duration=7200.0)
        today = max(policy.bake, policy.min_requests / (rate * weight / 100))
        extra = [r.promoted_at - today for r in results if r.promoted_at is not None]
        rows.append((
            f"healthy canary (1% errors): extra time to promotion vs bake and min_requests ({today:.0f} s), "
            f"{rate} req/s, {weight}% share: {n(200)} stages",
            f"promoted {len(extra)}/{len(results)}; extra median {_seconds(extra, 0.5)}, p90 {_seconds(extra, 0.9)}",
            "reported",
        ))
    return rows


def _count(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ranked = sorted(values)
    return f"{ranked[min(len(ranked) - 1, int(q * len(ranked)))]:.0f}"


def run_all(*, scale: float = 1.0, seed: int = 1) -> list[Row]:
    """All scenarios; rows of (scenario, result, target)."""
    return _alarm_rows(scale, seed) + _detection_rows(scale, seed)


def _print(rows: list[Row]) -> None:
    print("| scenario | result | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds-scale", type=float, default=1.0, help="multiply every seed count")
    parser.add_argument("--quick", action="store_true", help="a small run (seeds scale 0.05), e.g. for CI")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    scale = 0.05 if args.quick else args.seeds_scale
    started = time.perf_counter()
    _print(issue_rows(scale, args.seed))
    print("\nMore scenarios (alarm rates and detection of the fast detectors):\n")
    _print(run_all(scale=scale, seed=args.seed))
    policy = Policy()
    command = "--quick" if args.quick else f"--seeds-scale {scale:g}"
    print(
        f"\n{time.perf_counter() - started:.0f} s; default policy: alpha {policy.alpha:g} per test, "
        f"comparison alpha {policy.compare_alpha:g}, beta {policy.beta:g}, analysis.min_requests "
        f"{policy.analysis_min_requests}, rollout.bake {policy.bake:g} s, rollout.min_requests {policy.min_requests}, "
        f"latency regression p95_ratio {policy.p95_ratio:g} / min_delta {policy.min_delta * 1000:g} ms, "
        f"ticks of 1 s; `python scripts/simulate.py {command} --seed {args.seed}`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
