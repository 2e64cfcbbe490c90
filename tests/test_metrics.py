"""GET /metrics of a real `canary serve`, parsed with prometheus-client's own parser and
checked against the traffic the test sent."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.admin_support import admin_post, edit, until_status
from tests.upstreams import STATS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# (forced arm, path, how many): 2xx, 3xx, 4xx, 5xx, and a proxy-made 504 ("error").
TRAFFIC = [
    ("baseline", "/ok", 6), ("baseline", "/status/302", 1), ("baseline", "/status/404", 2),
    ("baseline", "/status/500", 1), ("baseline", "/sleep/0.3", 1),
    ("canary", "/ok", 4), ("canary", "/status/503", 1), ("canary", "/sleep/2", 2),
]
EXPECTED_CODES = {
    ("baseline", "2xx"): 7, ("baseline", "3xx"): 1, ("baseline", "4xx"): 2, ("baseline", "5xx"): 1,
    ("baseline", "error"): 0, ("canary", "2xx"): 4, ("canary", "3xx"): 0, ("canary", "4xx"): 0,
    ("canary", "5xx"): 1, ("canary", "error"): 2,
}


async def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def send(url: str) -> Counter[int]:
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as session:
        async def one(arm: str, path: str) -> None:
            async with session.get(f"{url}{path}", headers={"X-Canary": arm}, allow_redirects=False) as response:
                await response.read()
                statuses[response.status] += 1

        await asyncio.gather(*(one(arm, path) for arm, path, n in TRAFFIC for _ in range(n)))
    return statuses


async def test_metrics_match_the_traffic_sent(canary, upstreams):
    proxy = await canary(weight=50, canary_timeout="500ms")
    assert (await send(proxy.proxy_url))[504] == 2
    samples, types = await scrape(proxy.admin_url)
    assert types == {
        "canary_requests": "counter", "canary_request_duration_seconds": "histogram",
        "canary_inflight_requests": "gauge", "canary_weight_percent": "gauge", "canary_rollout_state": "gauge",
        "canary_rollbacks": "counter", "canary_config_reloads": "counter", "canary_fallbacks": "counter",
        "canary_shadow_requests": "counter", "canary_shadow_dropped": "counter",
        "canary_shed": "counter",
        "canary_websockets_open": "gauge",
    }
    for reason in ("max_connections", "descriptors", "memory", "pool_exhausted"):
        assert value(samples, "canary_shed_total", reason=reason) == 0, reason
    for (arm, code), expected in EXPECTED_CODES.items():
        assert value(samples, "canary_requests_total", arm=arm, code=code) == expected, (arm, code)

    assert value(samples, "canary_request_duration_seconds_count", arm="baseline") == 11
    assert value(samples, "canary_request_duration_seconds_count", arm="canary") == 7
    buckets = {le: value(samples, "canary_request_duration_seconds_bucket", arm="baseline", le=le) for le in ("0.25", "0.5", "+Inf")}
    assert buckets == {"0.25": 10, "0.5": 11, "+Inf": 11}  # the one 0.3 s request
    assert 0.3 <= value(samples, "canary_request_duration_seconds_sum", arm="baseline") < 1.0
    assert value(samples, "canary_request_duration_seconds_bucket", arm="canary", le="0.25") == 5
    assert value(samples, "canary_weight_percent") == 50
    assert value(samples, "canary_rollout_state", state="manual") == 1
    assert sum(value(samples, "canary_rollout_state", state=s) for s in ("progressing", "paused", "rolled_back", "promoted")) == 0
    assert value(samples, "canary_rollbacks_total") == 0
    assert value(samples, "canary_config_reloads_total", result="ok") == 0
    # routing.fallback is off: the two canary 504s reached their clients
    assert [value(samples, "canary_fallbacks_total", kind=k) for k in ("connect", "timeout", "5xx")] == [0, 0, 0]
    # no shadow stage: nothing mirrored, nothing dropped
    assert value(samples, "canary_shadow_requests_total") == 0
    assert value(samples, "canary_shadow_dropped_total", reason="queue_full") == 0


async def test_metrics_follow_inflight_rollbacks_and_reloads(canary, upstreams):
    proxy = await canary(weight=50)
    hanging = upstreams["baseline"].app[STATS]
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.get(f"{proxy.proxy_url}/hang", headers={"X-Canary": "baseline"}))
        while hanging.inflight < 1:
            await asyncio.sleep(0.01)
        samples, _ = await scrape(proxy.admin_url)
        assert value(samples, "canary_inflight_requests", arm="baseline") == 1
        assert value(samples, "canary_inflight_requests", arm="canary") == 0
        hanging.release.set()
        async with await request as response:
            assert response.status == 200

    assert (await admin_post(proxy, "/rollback", {"reason": "metrics test"}))[0] == 200
    edit(proxy.config, "weight: 50", "weight: 500")
    await until_status(proxy, lambda s: s["config"]["reloads"]["rejected"] == 1, timeout=2.0)
    edit(proxy.config, "weight: 500", "weight: 50")  # back to the weight it had: still rolled back
    await until_status(proxy, lambda s: s["config"]["reloads"]["ok"] == 1, timeout=2.0)
    samples, _ = await scrape(proxy.admin_url)
    assert value(samples, "canary_inflight_requests", arm="baseline") == 0
    assert value(samples, "canary_rollbacks_total") == 1
    assert value(samples, "canary_weight_percent") == 0
    assert value(samples, "canary_rollout_state", state="rolled_back") == 1
    assert value(samples, "canary_config_reloads_total", result="ok") == 1
    assert value(samples, "canary_config_reloads_total", result="rejected") == 1


async def test_config_reloads_are_counted_by_result(canary):
    proxy = await canary(weight=10)
    edit(proxy.config, "weight: 10", "weight: 150")  # rejected
    await until_status(proxy, lambda s: s["config"]["error"] is not None, timeout=3)
    edit(proxy.config, "weight: 150", "weight: 20")  # accepted
    await until_status(proxy, lambda s: s["weight"] == 20, timeout=3)
    samples, _ = await scrape(proxy.admin_url)
    assert value(samples, "canary_config_reloads_total", result="rejected") == 1
    assert value(samples, "canary_config_reloads_total", result="ok") == 1
