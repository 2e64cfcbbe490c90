"""Forwarding through the real proxy app to real upstream servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp

from config.settings import PoolSettings, RoutingSettings, StickyKey, TimeoutSettings
from tests.conftest import upstream_settings
from tests.polling import until
from tests.upstreams import GZIP_BODY, STATS, break_off_uploads, raw_upstream


async def test_method_path_query_and_body_reach_the_chosen_upstream(proxy_factory):
    server, _ = await proxy_factory(weight=100)
    async with aiohttp.ClientSession() as client:
        async with client.put(server.make_url("/v1/things?a=1&b=%20x"), data=b"payload") as resp:
            echo = await resp.json()
    assert resp.status == 200
    assert echo["arm"] == "canary"
    assert echo["method"] == "PUT"
    assert echo["path_qs"] == "/v1/things?a=1&b=%20x"
    assert echo["body_len"] == 7
    assert resp.headers["X-Canary-Arm"] == "canary"


async def test_hop_by_hop_headers_dropped_both_ways_and_forwarded_headers_set(proxy_factory):
    server, _ = await proxy_factory(weight=0)
    headers = {
        "Connection": "keep-alive, X-Private",
        "X-Private": "hop-only",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "TE": "trailers",
        "X-Forwarded-For": "10.1.1.1",
        "X-End-To-End": "kept",
    }
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/echo"), headers=headers) as resp:
            echo = await resp.json()
    seen = {k.lower(): v for k, v in echo["headers"].items()}
    assert "x-private" not in seen and "proxy-authorization" not in seen and "te" not in seen
    assert seen["x-end-to-end"] == "kept"
    assert seen["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{server.port}"
    # the upstream's Connection-listed X-Hop and Keep-Alive never reach the client
    assert "X-Hop" not in resp.headers and "Keep-Alive" not in resp.headers
    assert resp.headers["X-Canary-Arm"] == "baseline"


async def test_gzip_body_passes_through_byte_for_byte(proxy_factory):
    server, _ = await proxy_factory(weight=50)
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        for arm in ("baseline", "canary"):
            async with client.get(server.make_url("/gzip"), headers={"X-Canary": arm}) as resp:
                raw = await resp.read()
            assert resp.headers["Content-Encoding"] == "gzip"
            assert raw == GZIP_BODY


async def test_head_bodiless_statuses_and_chunked_answers_keep_their_framing(proxy_factory):
    server, _ = await proxy_factory(weight=100)
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        for _ in range(2):  # the second round reuses the upstream connections
            async with client.head(server.make_url("/gzip")) as resp:
                assert resp.status == 200 and await resp.read() == b""
                assert resp.headers["Content-Length"] == str(len(GZIP_BODY))
            for code in (204, 304):
                async with client.get(server.make_url(f"/status/{code}")) as resp:
                    assert resp.status == code and await resp.read() == b""
            async with client.get(server.make_url("/chunked")) as resp:
                assert await resp.read() == b"one,two"
            async with client.get(server.make_url("/gzip")) as resp:
                assert await resp.read() == GZIP_BODY


async def test_gzip_request_body_passes_through_compressed(proxy_factory):
    server, _ = await proxy_factory(weight=100)
    raw = b"hello compressed upload " * 1000
    headers = {"Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/echo"), data=gzip.compress(raw), headers=headers) as resp:
            echo = await resp.json()  # the upstream could decompress it: it came as sent
    assert resp.status == 200 and echo["body_len"] == len(raw)
    assert echo["headers"]["Content-Encoding"] == "gzip"


async def test_sse_first_event_arrives_before_the_stream_ends(proxy_factory, upstreams):
    server, _ = await proxy_factory(weight=100)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/sse")) as resp:
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
            assert first == b"data: first\n\n"  # the upstream holds the rest until released
            upstreams["canary"].app[STATS].release.set()
            rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_unreachable_upstream_is_502_with_json_body(proxy_factory, unused_tcp_port):
    dead = upstream_settings("canary", f"http://127.0.0.1:{unused_tcp_port}")
    server, state = await proxy_factory(weight=100, canary=dead)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/x")) as resp:
            body = await resp.json()
    assert resp.status == 502
    assert body == {"error": "canary: the upstream is unreachable or broke the connection",
                    "kind": "upstream_unreachable", "arm": "canary"}
    assert str(unused_tcp_port) not in json.dumps(body)  # no internal address reaches clients
    assert state.recorder.arms["canary"].stage_counts().errors == 1


async def test_slow_upstream_is_504(proxy_factory, upstreams):
    slow = upstream_settings("canary", upstreams["canary"], timeout=TimeoutSettings(connect=1, total=0.2))
    server, _ = await proxy_factory(weight=100, canary=slow)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/sleep/5")) as resp:
            body = await resp.json()
    assert resp.status == 504 and body["arm"] == "canary" and "timed out" in body["error"]


async def test_exhausted_pool_is_503(proxy_factory, upstreams):
    tiny = upstream_settings(
        "canary", upstreams["canary"],
        pool=PoolSettings(max_connections=1, max_keepalive=1),
        timeout=TimeoutSettings(connect=0.2, total=10),
    )
    server, _ = await proxy_factory(weight=100, canary=tiny)
    async with aiohttp.ClientSession() as client:
        holder = asyncio.ensure_future(client.get(server.make_url("/hang")))
        await until(lambda: upstreams["canary"].app[STATS].inflight == 1)
        async with client.get(server.make_url("/x")) as resp:
            body = await resp.json()
        upstreams["canary"].app[STATS].release.set()
        (await holder).release()
    assert resp.status == 503 and body["arm"] == "canary"


async def test_upstream_5xx_counts_as_error_and_4xx_does_not(proxy_factory):
    server, state = await proxy_factory(weight=100)
    async with aiohttp.ClientSession() as client:
        for path in ("/status/500", "/status/404", "/status/200"):
            async with client.get(server.make_url(path)) as resp:
                await resp.read()
    counts = state.recorder.arms["canary"].stage_counts()
    assert (counts.requests, counts.errors) == (3, 1)


async def test_force_header_overrides_the_split(proxy_factory):
    server, _ = await proxy_factory(weight=0)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/"), headers={"X-Canary": "canary"}) as resp:
            assert (await resp.json())["arm"] == "canary"
        async with client.get(server.make_url("/"), headers={"X-Canary": "bogus"}) as resp:
            assert (await resp.json())["arm"] == "baseline"


async def test_paths_outside_the_split_go_to_baseline(proxy_factory):
    routing = RoutingSettings(paths=("/v1/chat",))
    server, _ = await proxy_factory(weight=100, routing=routing)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/v1/chat/completions")) as resp:
            assert (await resp.json())["arm"] == "canary"
        async with client.get(server.make_url("/v1/models")) as resp:
            assert (await resp.json())["arm"] == "baseline"
        async with client.get(server.make_url("/v1/chat")) as resp:
            assert (await resp.json())["arm"] == "canary"
        async with client.get(server.make_url("/v1/chatty")) as resp:  # a prefix is whole segments
            assert (await resp.json())["arm"] == "baseline"


async def test_random_split_ratio_is_within_binomial_tolerance(proxy_factory):
    server, _ = await proxy_factory(weight=25, seed=7)
    n = 800
    arms = await _arms_of(server, [{} for _ in range(n)])
    canary = arms.count("canary")
    sd = (n * 0.25 * 0.75) ** 0.5
    assert abs(canary - n * 0.25) < 4 * sd, canary


async def test_sticky_key_is_consistent_and_only_moves_to_canary_when_weight_rises(proxy_factory):
    routing = RoutingSettings(sticky_key=StickyKey(source="cookie", name="uid"))
    server, state = await proxy_factory(weight=20, routing=routing)
    users = [{"Cookie": f"uid=user-{i}"} for i in range(200)]
    first = await _arms_of(server, users)
    again = await _arms_of(server, users)
    assert first == again
    assert 20 < first.count("canary") < 70
    state.router.set_weight(60)
    later = await _arms_of(server, users)
    assert all(b == "canary" for a, b in zip(first, later) if a == "canary")
    assert later.count("canary") > first.count("canary")


async def test_absolute_form_target_never_reaches_another_host(proxy_factory):
    server, _ = await proxy_factory(weight=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET http://example.invalid/steal?x=1 HTTP/1.1\r\nHost: example.invalid\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    echo = json.loads(body)
    assert echo["arm"] == "baseline" and echo["path_qs"] == "/steal?x=1"


async def test_upstream_breaking_mid_body_truncates_the_client_response(proxy_factory):
    server, state = await proxy_factory(weight=100)
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/broken")) as resp:
            try:
                await resp.read()
                truncated = False
            except aiohttp.ClientPayloadError:
                truncated = True
    assert truncated
    assert state.recorder.arms["canary"].stage_counts().errors == 1


async def test_client_disconnect_is_not_an_upstream_error(proxy_factory, upstreams):
    server, state = await proxy_factory(weight=100)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await until(lambda: upstreams["canary"].app[STATS].inflight == 1)
    writer.close()
    upstreams["canary"].app[STATS].release.set()
    await until(lambda: upstreams["canary"].app[STATS].inflight == 0)
    await until(lambda: state.recorder.arms["canary"].snapshot(0).inflight == 0)
    assert state.recorder.arms["canary"].stage_counts().errors == 0


async def _arms_of(server, header_sets: list[dict[str, str]]) -> list[str]:
    async with aiohttp.ClientSession() as client:
        async def one(headers: dict[str, str]) -> str:
            async with client.get(server.make_url("/"), headers=headers) as resp:
                await resp.read()
                return resp.headers["X-Canary-Arm"]
        return list(await asyncio.gather(*(one(h) for h in header_sets)))



async def test_a_request_body_keeps_its_content_length_and_chunked_stays_chunked(proxy_factory):
    """A legacy upstream that cannot read chunked bodies still gets the client's length."""
    server, _ = await proxy_factory(weight=0)

    async def chunks():
        yield b"abc"
        yield b"defgh"

    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/echo"), data=b"x" * 3000) as resp:
            sized = await resp.json()
        async with client.post(server.make_url("/echo"), data=chunks()) as resp:
            streamed = await resp.json()
    sized_headers = {k.lower(): v for k, v in sized["headers"].items()}
    assert sized_headers.get("content-length") == "3000" and "transfer-encoding" not in sized_headers
    assert sized["body_len"] == 3000
    streamed_headers = {k.lower(): v for k, v in streamed["headers"].items()}
    assert streamed_headers.get("transfer-encoding") == "chunked" and "content-length" not in streamed_headers
    assert streamed["body_len"] == 8


async def test_a_client_that_breaks_off_its_upload_is_not_an_upstream_error(proxy_factory, upstreams):
    server, state = await proxy_factory(weight=100)
    async def settled() -> None:
        await until(lambda: state.recorder.arms["canary"].inflight == 0, what="request settled")

    await break_off_uploads(server.port, upstreams["canary"].app[STATS], settle=settled)
    counts = state.recorder.arms["canary"].stage_counts()
    assert (counts.requests, counts.errors) == (0, 0)


async def test_expect_100_continue_is_answered_and_a_bad_expect_refused(proxy_factory):
    server, state = await proxy_factory(weight=100)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/upload"), data=b"abc", headers={"Expect": "magic"}) as resp:
            assert resp.status == 417
    assert state.recorder.arms["canary"].inflight == 0  # the refused one was never counted
    assert state.recorder.arms["canary"].stage_counts().requests == 1


async def test_a_client_stalling_its_upload_is_not_an_upstream_timeout(proxy_factory, upstreams):
    slow = upstream_settings("canary", upstreams["canary"], timeout=TimeoutSettings(connect=1, total=0.3))
    server, state = await proxy_factory(weight=100, canary=slow)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhello")  # then nothing
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    counts = state.recorder.arms["canary"].stage_counts()
    assert (counts.requests, counts.errors) == (0, 0)


async def test_expect_is_answered_by_the_proxy_and_not_forwarded(proxy_factory):
    server, _ = await proxy_factory(weight=0)
    async with aiohttp.ClientSession() as client:
        async with client.post(server.make_url("/echo"), data=b"x" * 10, expect100=True) as resp:
            echo = await resp.json()
    assert resp.status == 200 and echo["body_len"] == 10
    assert "expect" not in {k.lower() for k in echo["headers"]}


async def test_a_response_header_that_cannot_be_forwarded_counts_as_a_proxy_error(proxy_factory):
    async with raw_upstream(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok") as url:
        server, state = await proxy_factory(weight=100, canary=upstream_settings("canary", url))
        async with aiohttp.ClientSession() as client:
            try:
                async with client.get(server.make_url("/x")) as resp:
                    status = resp.status
                    await resp.read()
            except aiohttp.ClientError:
                status = None  # the proxy closed the connection: nothing half-valid was sent
        await until(lambda: state.recorder.arms["canary"].inflight == 0, what="the request recorded")
    assert status in (None, 502)
    counts = state.recorder.arms["canary"].stage_counts()
    # aiohttp's client may retry the GET once after the closed connection: each try is an error
    assert counts.requests >= 1 and counts.errors == counts.requests
