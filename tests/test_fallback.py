"""Fallback to the baseline (CONTRACT §8) through the real proxy app and real upstreams:
each failure kind is replayed on the baseline, the canary's failure still counts against
the canary, and what must stream (large or unknown-length bodies, a started stream) is
never replayed."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from config.settings import FallbackSettings, TimeoutSettings
from tests.conftest import upstream_settings
from tests.upstreams import STATS

ON = FallbackSettings(enabled=True)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def outcomes(state, arm: str) -> dict[str, int]:
    totals = state.recorders[arm].code_totals
    return dict(zip(("2xx", "3xx", "4xx", "5xx", "error"), totals))


async def test_a_canary_that_cannot_be_reached_is_answered_by_the_baseline(proxy_factory, upstreams):
    server, state = await proxy_factory(weight=100, fallback=ON, canary=upstream_settings("canary", closed_port_url()))
    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/v1/chat?x=1"), data=b"q" * 5000) as resp:
            echo = await resp.json()
    assert resp.status == 200
    assert (resp.headers["X-Canary-Arm"], resp.headers["X-Canary-Fallback"]) == ("baseline", "connect")
    assert (echo["arm"], echo["method"], echo["path_qs"], echo["body_len"]) == ("baseline", "POST", "/v1/chat?x=1", 5000)
    assert outcomes(state, "canary")["error"] == 1  # the canary's failure still counts against it
    assert outcomes(state, "baseline")["2xx"] == 1
    assert state.fallback.counts == {"connect": 1, "timeout": 0, "5xx": 0}
    assert upstreams["baseline"].app[STATS].hits == 1


async def test_a_canary_that_times_out_is_answered_by_the_baseline(proxy_factory, upstreams):
    canary_stats = upstreams["canary"].app[STATS]
    canary_stats.hang = True  # every canary request waits until released
    canary = upstream_settings("canary", upstreams["canary"], timeout=TimeoutSettings(connect=2.0, total=0.2))
    server, state = await proxy_factory(weight=100, fallback=ON, canary=canary)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(server.make_url("/v1/models")) as resp:
                echo = await resp.json()
    finally:
        canary_stats.release.set()
    assert (resp.status, echo["arm"]) == (200, "baseline")
    assert resp.headers["X-Canary-Fallback"] == "timeout"
    assert outcomes(state, "canary")["error"] == 1
    assert state.fallback.counts["timeout"] == 1
    assert upstreams["baseline"].app[STATS].hits == 1


async def test_a_canary_5xx_is_replayed_with_its_body_on_the_baseline(proxy_factory, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 1.0  # every canary answer is a 500
    server, state = await proxy_factory(weight=100, fallback=ON)
    async with aiohttp.ClientSession() as client:
        async with client.put(server.make_url("/v1/things"), data=b"payload") as resp:
            echo = await resp.json()
    assert (resp.status, echo["arm"], echo["method"], echo["body_len"]) == (200, "baseline", "PUT", 7)
    assert resp.headers["X-Canary-Arm"] == "baseline"
    assert resp.headers["X-Canary-Fallback"] == "5xx"
    assert outcomes(state, "canary")["5xx"] == 1
    assert outcomes(state, "baseline")["2xx"] == 1
    assert (upstreams["canary"].app[STATS].hits, upstreams["baseline"].app[STATS].hits) == (1, 1)


async def test_only_the_listed_kinds_fall_back(proxy_factory, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 1.0
    server, _ = await proxy_factory(weight=100, fallback=FallbackSettings(enabled=True, on=("connect", "timeout")))
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/v1/models")) as resp:
            await resp.read()
    assert (resp.status, resp.headers["X-Canary-Arm"]) == (500, "canary")
    assert "X-Canary-Fallback" not in resp.headers
    assert upstreams["baseline"].app[STATS].hits == 0


async def test_when_the_baseline_fails_too_the_client_gets_the_baseline_error(proxy_factory):
    server, state = await proxy_factory(
        weight=100, fallback=ON,
        canary=upstream_settings("canary", closed_port_url()),
        baseline=upstream_settings("baseline", closed_port_url()),
    )
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/v1/models")) as resp:
            body = await resp.json()
    assert (resp.status, body["arm"]) == (502, "baseline")
    assert (resp.headers["X-Canary-Arm"], resp.headers["X-Canary-Fallback"]) == ("baseline", "connect")
    assert (outcomes(state, "canary")["error"], outcomes(state, "baseline")["error"]) == (1, 1)


@pytest.mark.parametrize("chunked", [False, True], ids=["larger-than-max-body", "unknown-length"])
async def test_a_body_that_is_not_kept_streams_to_the_canary_without_fallback(proxy_factory, upstreams, chunked):
    upstreams["canary"].app[STATS].fail_ratio = 1.0
    server, state = await proxy_factory(weight=100, fallback=FallbackSettings(enabled=True, max_body=1024))

    async def chunks():
        yield b"x" * 100  # small, but its length is unknown up front

    data = chunks() if chunked else b"x" * 2048
    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/v1/upload-elsewhere"), data=data) as resp:
            await resp.read()
    assert (resp.status, resp.headers["X-Canary-Arm"]) == (500, "canary")
    assert "X-Canary-Fallback" not in resp.headers
    assert upstreams["baseline"].app[STATS].hits == 0
    assert state.fallback.counts["5xx"] == 0
    assert state.fallback.held == 0


def stream_then_break_app(release: asyncio.Event) -> web.Application:
    """A canary whose SSE stream sends one event, then breaks the connection."""

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get("/v1/stream", sse)
    return app


async def test_a_stream_that_started_is_never_replayed(proxy_factory, upstreams, aiohttp_server):
    release = asyncio.Event()
    canary = await aiohttp_server(stream_then_break_app(release))
    server, state = await proxy_factory(weight=100, fallback=ON, canary=upstream_settings("canary", canary))
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/v1/stream")) as resp:
            first = await resp.content.readline()
            release.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # visibly truncated, not completed by the baseline
    assert first == b"data: first\n"
    assert resp.headers["X-Canary-Arm"] == "canary"
    assert "X-Canary-Fallback" not in resp.headers
    assert upstreams["baseline"].app[STATS].hits == 0
    assert outcomes(state, "canary")["error"] == 1
    assert state.fallback.counts == {"connect": 0, "timeout": 0, "5xx": 0}


async def test_without_fallback_the_canary_failure_reaches_the_client(proxy_factory, upstreams):
    upstreams["canary"].app[STATS].fail_ratio = 1.0
    server, _ = await proxy_factory(weight=100)  # routing.fallback is off by default
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/v1/models")) as resp:
            await resp.read()
    assert (resp.status, resp.headers["X-Canary-Arm"]) == (500, "canary")
    assert upstreams["baseline"].app[STATS].hits == 0


def test_fallback_settings_are_read_and_checked(tmp_path):
    from tests.test_config import MINIMAL, load, problems

    settings = load(tmp_path, MINIMAL + "routing:\n  fallback: {enabled: true, on: [5xx, connect], max_body: 64KiB}\n")
    assert settings.routing.fallback == FallbackSettings(enabled=True, on=("5xx", "connect"), max_body=65536)
    assert load(tmp_path, MINIMAL).routing.fallback == FallbackSettings(enabled=False, max_body=1024 * 1024)
    bad = problems(tmp_path, MINIMAL + "routing:\n  fallback: {enabled: 1, on: [4xx], max_body: -1}\n")
    assert [line.split(": ", 2)[1] for line in bad] == [
        "routing.fallback.enabled", "routing.fallback.max_body", "routing.fallback.on[0]",
    ]
    assert "must be one of connect, timeout, 5xx, got '4xx'" in bad[2]


def test_fallback_keeps_bodies_within_a_memory_bound_and_needs_a_failure_kind(tmp_path):
    from tests.test_config import MINIMAL, problems

    bad = problems(tmp_path, MINIMAL + "routing:\n  fallback: {enabled: true, on: [], max_body: 100GiB}\n")
    assert [line.split(": ", 2)[1] for line in bad] == ["routing.fallback.max_body", "routing.fallback.on"]
    assert "at most 64MiB" in bad[0] and "at least one failure kind" in bad[1]
