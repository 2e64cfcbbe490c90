"""Prometheus metrics for the admin listener's `GET /metrics` (names: CONTRACT §6).

A custom collector reads the outcome recorder's cumulative totals, the router's weight and
the rollout controller at scrape time, so the request hot path does no metric work at all.
Labels stay low-cardinality: the arm, the code class, the rollout state, the reload result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from config.settings import ARMS
from rollout.evidence import CODE_CLASSES, LATENCY_EDGES, PROMETHEUS_BUCKETS, ArmTotals, EvidenceSource
from rollout.state import STATES

__all__ = ["CanaryCollector", "MetricsSource", "RELOAD_RESULTS", "histogram_buckets", "make_registry", "render"]

RELOAD_RESULTS = ("ok", "rejected")
# For each Prometheus bucket: how many recorder bins (over LATENCY_EDGES) fall at or below it.
_BUCKET_BINS = tuple(LATENCY_EDGES.index(edge) + 1 for edge in PROMETHEUS_BUCKETS)


@dataclass(frozen=True, kw_only=True)
class MetricsSource:
    """Where the figures come from, each read once per scrape."""

    recorder: EvidenceSource  # one process's recorder, or the sum of the workers'
    weight: Callable[[], int]
    state: Callable[[], str]
    rollbacks: Callable[[], int]
    reloads: Callable[[], dict[str, int]]  # RELOAD_RESULTS -> count
    monotonic: Callable[[], float]
    fallbacks: Callable[[], Mapping[str, int]] = dict  # kind -> canary requests replayed on the baseline
    shadow_mirrored: Callable[[], int] = int  # copies sent to the canary during shadow
    shadow_dropped: Callable[[], Mapping[str, int]] = dict  # reason -> copies not sent
    shed: Callable[[], Mapping[str, int]] = dict  # reason -> requests refused for the proxy's own lack
    websockets_open: Callable[[], Mapping[str, int]] = dict  # arm -> open WebSockets


def histogram_buckets(latency_totals: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative `le` buckets from the recorder's per-bin latency counts."""
    buckets = [(_le(edge), float(sum(latency_totals[:bins]))) for edge, bins in zip(PROMETHEUS_BUCKETS, _BUCKET_BINS)]
    buckets.append(("+Inf", float(sum(latency_totals))))
    return buckets


def _le(edge: float) -> str:
    return repr(float(edge))


class CanaryCollector(Collector):
    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are fixed; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        arms: dict[str, ArmTotals] = dict(self.source.recorder.arms)
        yield self._requests(arms)
        yield self._durations(arms)
        yield self._inflight()
        weight = GaugeMetricFamily("canary_weight_percent", "Percent of eligible requests sent to the canary.")
        weight.add_metric([], float(self.source.weight()))
        yield weight
        yield self._states()
        rollbacks = CounterMetricFamily("canary_rollbacks_total", "Rollbacks since this proxy started.")
        rollbacks.add_metric([], float(self.source.rollbacks()))
        yield rollbacks
        yield self._reloads()
        yield self._fallbacks()
        yield from self._shadow()
        yield self._shed()
        yield self._websockets()

    def _requests(self, arms: dict[str, ArmTotals]) -> Metric:
        family = CounterMetricFamily(
            "canary_requests_total",
            "Completed proxied requests by arm and status class (error: the proxy answered 502/503/504).",
            labels=["arm", "code"],
        )
        for arm in ARMS:
            for code, total in zip(CODE_CLASSES, arms[arm].code_totals):
                family.add_metric([arm, code], float(total))
        return family

    def _durations(self, arms: dict[str, ArmTotals]) -> Metric:
        family = HistogramMetricFamily(
            "canary_request_duration_seconds",
            "Time to the upstream's response headers (time to first token for streams), by arm.",
            labels=["arm"],
        )
        for arm in ARMS:
            recorder = arms[arm]
            family.add_metric([arm], histogram_buckets(recorder.latency_totals), recorder.latency_sum)
        return family

    def _inflight(self) -> Metric:
        family = GaugeMetricFamily("canary_inflight_requests", "Requests in flight, by arm.", labels=["arm"])
        for arm in ARMS:
            family.add_metric([arm], float(self.source.recorder.arms[arm].inflight))
        return family

    def _states(self) -> Metric:
        family = GaugeMetricFamily(
            "canary_rollout_state", "1 for the current rollout state, 0 for the others.", labels=["state"]
        )
        current = self.source.state()
        for state in STATES:
            family.add_metric([state], 1.0 if state == current else 0.0)
        return family

    def _reloads(self) -> Metric:
        family = CounterMetricFamily(
            "canary_config_reloads_total", "Config reloads by result (ok, rejected).", labels=["result"]
        )
        counts = self.source.reloads()
        for result in RELOAD_RESULTS:
            family.add_metric([result], float(counts.get(result, 0)))
        return family


    def _websockets(self) -> Metric:
        family = GaugeMetricFamily("canary_websockets_open", "Open WebSocket connections, by arm.", labels=["arm"])
        counts = self.source.websockets_open()
        for arm in ARMS:
            family.add_metric([arm], float(counts.get(arm, 0)))
        return family

    def _fallbacks(self) -> Metric:
        family = CounterMetricFamily(
            "canary_fallbacks_total",
            "Canary requests answered by the baseline after the canary failed, by kind (connect, timeout, 5xx).",
            labels=["kind"],
        )
        for kind, total in self.source.fallbacks().items():
            family.add_metric([kind], float(total))
        return family

    def _shed(self) -> Metric:
        family = CounterMetricFamily(
            "canary_shed_total",
            "Requests the proxy refused (503) for want of its own resources, by reason; never counted against an arm.",
            labels=["reason"],
        )
        for reason, count in self.source.shed().items():
            family.add_metric([reason], float(count))
        return family


    def _shadow(self) -> Iterator[Metric]:
        mirrored = CounterMetricFamily(
            "canary_shadow_requests", "Copies of requests sent to the canary during the shadow stage (answers discarded)."
        )
        mirrored.add_metric([], float(self.source.shadow_mirrored()))
        yield mirrored
        dropped = CounterMetricFamily(
            "canary_shadow_dropped",
            "Copies not sent to the canary, by reason (queue_full, body_too_large, pool_exhausted).",
            labels=["reason"],
        )
        for reason, total in self.source.shadow_dropped().items():
            dropped.add_metric([reason], float(total))
        yield dropped


def make_registry(source: MetricsSource) -> CollectorRegistry:
    """A registry of our own (never the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CanaryCollector(source))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
