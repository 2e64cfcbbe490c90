"""Hostile clients and hostile upstreams against a real `canary serve` (issue 11).

Raw sockets where a client library would refuse the input; every HTTP/1.1 upstream
client (`upstreams.NAME.client`) where the upstream side matters."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from config.settings import HTTP1_CLIENTS
from tests.admin_support import admin_get
from tests.hardening_support import (
    arm_figures,
    exchange,
    get,
    hardened_config,
    read_head,
    resetting_upstream,
    status_code,
)
from tests.polling import until, until_async
from tests.serve_process import write_config
from tests.upstreams import STATS, raw_upstream


@pytest.fixture(params=HTTP1_CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    return request.param


# -- 2. CONNECT -----------------------------------------------------------------------------
async def test_connect_and_trace_are_refused_405_and_never_reach_an_upstream(canary, upstreams, tmp_path, client):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, client=client, weight=50))
    tunnel = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    for raw in (tunnel, b"TRACE / HTTP/1.1\r\nHost: x\r\nCookie: secret=1\r\n\r\n"):
        answer = await exchange(proxy.proxy_port, raw)  # read to the close: the proxy closes it
        head = answer.partition(b"\r\n\r\n")[0]
        assert status_code(head) == 405 and b"Allow: GET" in head
    assert upstreams["baseline"].app[STATS].hits == 0 and upstreams["canary"].app[STATS].hits == 0
    async with aiohttp.ClientSession() as session:  # the pooled upstream connections are clean
        results = [await get(session, f"{proxy.proxy_url}/after") for _ in range(6)]
    assert {status for status, _ in results} == {200}
    assert (await arm_figures(proxy))["requests"] + (await arm_figures(proxy, "baseline"))["requests"] == 6


# -- 3. a truncated upstream answer -----------------------------------------------------------
async def test_an_answer_the_upstream_resets_reaches_the_client_truncated_and_counts(canary, upstreams, tmp_path, client):
    release = asyncio.Event()
    async with resetting_upstream(release) as url:
        proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, client=client, canary_url=url))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_head(reader)
        assert status_code(head) == 200 and b"chunked" in head.lower()
        received = b""
        while b"partial" not in received:
            received += await asyncio.wait_for(reader.read(65536), 10)
        release.set()  # now the upstream resets the connection
        try:
            received += await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            pass
        writer.close()
    assert not received.endswith(b"0\r\n\r\n"), received  # no final chunk: visibly cut short
    figures = await arm_figures(proxy)
    assert (figures["requests"], figures["errors"]) == (1, 1)


async def test_an_answer_delimited_by_a_clean_close_is_complete(canary, upstreams, tmp_path, client):
    async with raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe whole body") as url:
        proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, client=client, canary_url=url))
        async with aiohttp.ClientSession() as session:
            assert await get(session, f"{proxy.proxy_url}/x") == (200, "the whole body")
    figures = await arm_figures(proxy)
    assert (figures["requests"], figures["errors"]) == (1, 0)


# -- 4. the response head cap -------------------------------------------------------------------
@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * 1_000_000 + b"\r\n",  # one header of 1 MB
        b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(100)),  # 100 KB of ordinary lines
    ],
    ids=["one-huge-header", "many-headers"],
)
async def test_a_response_head_over_the_cap_is_502_and_counts_against_the_arm(canary, upstreams, tmp_path, client, head):
    async with raw_upstream(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\nok") as url:
        proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, client=client, canary_url=url))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.proxy_url}/x") as response:
                body = await response.json()
    assert response.status == 502 and body["arm"] == "canary"
    assert len(response.headers) < 20  # nothing of the huge head reached the client
    figures = await arm_figures(proxy)
    assert (figures["requests"], figures["errors"]) == (1, 1)
    failed = [e for e in proxy.events if e.get("event") == "upstream_failed"]
    assert len(failed) == 1 and failed[0]["status"] == 502


# -- 1. slow and idle clients -------------------------------------------------------------------
async def test_slowloris_connections_are_closed_by_the_header_timeout_while_traffic_flows(canary, upstreams, tmp_path):
    """300 connections that send half a head (half of them a byte every 100 ms): each is
    closed by the header timeout, and requests meanwhile are all answered."""
    limits = "header_timeout: 1s, keepalive_timeout: 1500ms"
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, limits=limits))

    async def slowloris(index: int, port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        closed = asyncio.ensure_future(reader.read())
        try:
            while index % 2 and not closed.done():  # a byte every 100 ms keeps nothing alive
                writer.write(b"X")
                await asyncio.wait([closed], timeout=0.1)
            return await asyncio.wait_for(closed, 15)
        except ConnectionError:
            return b""
        finally:
            writer.close()

    attackers = [asyncio.ensure_future(slowloris(i, proxy.proxy_port)) for i in range(300)]
    admin_attacker = asyncio.ensure_future(slowloris(0, proxy.admin_port))
    async with aiohttp.ClientSession() as session:
        answers = [await get(session, f"{proxy.proxy_url}/while-attacked") for _ in range(20)]
    assert {status for status, _ in answers} == {200}
    closed = await asyncio.gather(*attackers, admin_attacker)
    assert all(answer == b"" or answer.startswith(b"HTTP/1.1 408 ") for answer in closed), Counter(a[:40] for a in closed)
    assert sum(answer.startswith(b"HTTP/1.1 408 ") for answer in closed) > 250


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(canary, upstreams, tmp_path):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, limits="keepalive_timeout: 500ms"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
    writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await read_head(reader)
    assert status_code(head) == 200
    rest = await asyncio.wait_for(reader.read(), 10)  # the body, then the close
    writer.close()
    assert rest.endswith(b"}")  # only the JSON body of the one answer came


async def test_a_request_head_over_64_kib_is_refused_431(canary, upstreams, tmp_path):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams))
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 4000) for i in range(20))  # 80 KB, never finished
    answer = await exchange(proxy.proxy_port, b"GET / HTTP/1.1\r\nHost: x\r\n" + lines)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert upstreams["canary"].app[STATS].hits == 0


async def test_a_client_that_stops_reading_is_dropped_and_not_counted(canary, upstreams, tmp_path):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, limits="send_timeout: 500ms"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
    writer.write(b"GET /download/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read it
    await until(lambda: upstreams["canary"].app[STATS].hits == 1, what="the download starting")
    figures = await arm_figures(proxy)  # waits until the proxy dropped it
    writer.close()
    assert (figures["requests"], figures["errors"]) == (0, 0)


# -- shedding past max_connections ----------------------------------------------------------
async def test_past_max_connections_new_clients_get_503_at_once_and_idle_ones_make_room(canary, upstreams, tmp_path):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, limits="max_connections: 4"))
    stats = upstreams["canary"].app[STATS]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    holders = [asyncio.ensure_future(get(session, f"{proxy.proxy_url}/hang")) for _ in range(4)]
    await until(lambda: stats.inflight == 4, what="four requests held")
    answer = await exchange(proxy.proxy_port, b"GET /more HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_code(head) == 503 and b"Retry-After: 1" in head and b"connection limit" in body
    stats.release.set()
    assert [await holder for holder in holders] == [(200, "canary released")] * 4
    # the four connections are idle keep-alive ones now: a new client takes one's place
    async with aiohttp.ClientSession() as other:
        assert (await get(other, f"{proxy.proxy_url}/room"))[0] == 200
    await session.close()
    figures = await arm_figures(proxy)
    assert (figures["requests"], figures["errors"]) == (5, 0)
    metrics = await _metrics(proxy)
    assert 'canary_shed_total{reason="max_connections"} 1.0' in metrics


async def _metrics(proxy) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}/metrics") as response:
            return await response.text()


async def test_an_admin_body_that_stalls_is_408_and_the_admin_listener_keeps_answering(canary, upstreams, tmp_path):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams, limits="header_timeout: 1s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin_port)
    writer.write(b"POST /pause HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\nContent-Length: 100\r\n\r\n{")
    status = await admin_get(proxy, "/status")  # the listener still answers meanwhile
    assert status["state"] == "manual"
    head = await read_head(reader)
    writer.close()
    assert status_code(head) == 408
    assert (await admin_get(proxy, "/status"))["state"] == "manual"  # nothing was paused


@pytest.mark.parametrize(
    "request_head, status",
    [
        (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # a request line over 8 KiB
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-N%d: v\r\n" % i for i in range(200)) + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"l" * 20000 + b"\r\n\r\n", 400),  # a field over 16 KiB
    ],
    ids=["uri-over-8k", "200-headers", "field-over-16k"],
)
async def test_request_heads_past_the_parser_limits_are_refused_and_never_forwarded(
    canary, upstreams, tmp_path, request_head, status
):
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams))
    answer = await exchange(proxy.proxy_port, request_head)
    assert status_code(answer.partition(b"\r\n\r\n")[0]) == status
    assert upstreams["canary"].app[STATS].hits == 0 and upstreams["baseline"].app[STATS].hits == 0


async def test_each_worker_guards_its_connections_and_sheds_into_one_metric(canary, upstreams, tmp_path):
    """`workers: 2`: the header timeout closes a half-sent head on whichever worker took
    it, and a refusal past a worker's connection cap shows in the supervisor's metric."""
    config = hardened_config(tmp_path / "c.yaml", upstreams, limits="header_timeout: 1s, max_connections: 1")
    proxy = await canary(write_config(config, "workers: 2\n" + config.read_text()))
    stats = upstreams["canary"].app[STATS]
    answer = await exchange(proxy.proxy_port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert answer.startswith(b"HTTP/1.1 408 ")
    held: list[asyncio.StreamWriter] = []
    refused = 0
    while refused == 0:  # the kernel spreads connections: hold one per worker, then one more
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(writer)
        done, pending = await asyncio.wait([asyncio.ensure_future(reader.read(200))], timeout=0.5)
        refused += sum(task.result().startswith(b"HTTP/1.1 503 ") for task in done)
        for task in pending:
            task.cancel()
        assert len(held) < 50, "no worker ever refused"
    stats.release.set()
    for writer in held:
        writer.close()
    metrics = await until_async(
        lambda: _metrics(proxy), lambda text: 'canary_shed_total{reason="max_connections"} 0.0' not in text
    )
    assert 'canary_shed_total{reason="max_connections"}' in metrics
