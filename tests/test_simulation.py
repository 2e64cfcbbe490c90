"""A reduced run of scripts/simulate.py: the real engine on synthetic request streams,
checked against the targets of issue 3 (the full table is in docs/analysis.md)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rollout.engine import Policy

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "simulate.py"


@pytest.fixture(scope="module")
def simulate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("simulate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate"] = module
    spec.loader.exec_module(module)
    return module


def test_binomial_and_poisson_draws_have_the_right_mean(simulate: ModuleType) -> None:
    rng = random.Random(3)
    draws = [simulate.binomial(rng, 100, 0.2) for _ in range(4000)]
    assert 19.5 < sum(draws) / len(draws) < 20.5
    assert 4.8 < sum(simulate.poisson(rng, 5.0) for _ in range(4000)) / 4000 < 5.2


def test_a_healthy_canary_is_never_stepped_back_or_rolled_back(simulate: ModuleType) -> None:
    counts = simulate._first_actions(simulate._steady(10, 0.01), Policy(), 100, 5, 11)
    assert counts[None] + counts["promote"] == 100


def test_a_shared_outage_does_not_roll_back(simulate: ModuleType) -> None:
    counts = simulate._first_actions(simulate._bursty(100), Policy(), 40, 25, 12)
    assert counts[None] + counts["promote"] == 40


def test_a_canary_at_20_percent_errors_is_rolled_back_fast(simulate: ModuleType) -> None:
    traffic = simulate.Traffic(rate=100, canary_errors=0.20, baseline_errors=0.01)
    times = simulate._time_to_rollback(traffic, 5, Policy(), 40, 13)
    detected = sorted(t for t in times if t is not None)
    assert len(detected) >= 38  # rarely a step back to 0 comes first (<= alpha)
    assert detected[int(0.9 * len(detected)) - 1] < 60


def test_a_warning_level_canary_is_stepped_back_not_rolled_back(simulate: ModuleType) -> None:
    counts = simulate._first_actions(simulate._steady(100, 0.085), Policy(), 30, 25, 14)
    assert counts["step_back"] >= 28


def test_a_canary_between_the_threshold_and_twice_it_is_never_promoted(simulate: ModuleType) -> None:
    results = simulate._runs(simulate._steady(100, 0.075), Policy(), 10, 15, weight=25, duration=1800.0)
    assert not any(r.promoted_at is not None for r in results)


def test_a_canary_exactly_at_the_threshold_rarely_passes_the_promotion_gate(simulate: ModuleType) -> None:
    assert simulate._gate_alone(20, 16) <= 2  # beta = 5% of 20 is 1; room for sampling


def test_a_canary_at_0_8_x_the_threshold_is_promoted_once_shown_below(simulate: ModuleType) -> None:
    results = simulate._runs(simulate._steady(100, 0.04), Policy(bake=0.0), 5, 17, weight=25, duration=3600.0)
    assert sum(r.promoted_at is not None for r in results) >= 4


def test_a_canary_twice_as_slow_is_flagged_and_a_tenth_slower_or_a_shared_spike_is_not(simulate: ModuleType) -> None:
    slow = simulate._runs(simulate._latency(2.0), Policy(), 10, 18, weight=25)
    assert all(r.action == "step_back" and r.at < 120 for r in slow)
    for make in (simulate._latency(1.1), simulate._latency(1.0, spikes=3)):
        assert not any(r.action for r in simulate._runs(make, Policy(), 4, 19, weight=25))


def test_the_verdict_of_a_steady_8_percent_canary_never_reads_ok_after_its_alarm(simulate: ModuleType) -> None:
    results = simulate._runs(simulate._steady(100, 0.08), Policy(on_warning="pause"), 5, 20, weight=25,
                             watch_verdict=True)
    assert all(r.action == "pause" for r in results) and not any(r.ok_after_alarm for r in results)


def test_the_script_prints_a_markdown_table(simulate: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate.main(["--seeds-scale", "0.01"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| scenario | result | target |\n|---|---|---|\n")
    assert out.count("\n| ") >= 24
    assert "verdict stability" in out and "shared latency spike" in out
