"""Shutdown never waits on an idle keep-alive connection, on any supported Python.

Since Python 3.12.1 `asyncio.Server.wait_closed()` waits until every connection is gone,
so a shutdown that closes the listener and then waits would hang on a client (or an
upstream pool) that merely keeps a connection open. These tests hold such connections
and check that `canary serve` (one process, or a supervisor and its workers) still exits
at once on SIGTERM, and that closing the upstream clients also closes the ones a reload
replaced."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from multidict import CIMultiDict

from config.settings import Upstreams
from proxy.upstream.pool import UpstreamClients
from tests.admin_support import upstream_url
from tests.conftest import upstream_settings
from tests.polling import until
from tests.serve_process import ServeProcess, write_config
from tests.upstreams import STATS

DRAIN_TIMEOUT = 20.0  # seconds; a drain that waited on idle connections would take all of it
IDLE_CLIENTS = 5


def drain_config(tmp_path: Path, upstreams, *, workers: int, client: str) -> Path:
    base, canary = upstream_url(upstreams["baseline"]), upstream_url(upstreams["canary"])
    return write_config(
        tmp_path / "canary.yaml",
        f"""
workers: {workers}
listen: "127.0.0.1:0"
drain_timeout: {DRAIN_TIMEOUT:g}s
admin: {{listen: "127.0.0.1:0", token: "test-token"}}
upstreams: {{baseline: {{url: "{base}", client: {client}}}, canary: {{url: "{canary}", client: {client}}}}}
rollout: {{weight: 50}}
state: {{path: "var/state.json"}}
logging: {{level: info, format: json}}
""",
    )


async def idle_keepalive_connection(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that made one keep-alive request, read the whole answer and now waits."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return reader, writer


@pytest.mark.parametrize(
    ("loop", "http1_client", "workers"),
    [("uvloop", "aiohttp", 1), ("uvloop", "lean", 1), ("asyncio", "aiohttp", 1), ("asyncio", "lean", 1),
     ("asyncio", "aiohttp", 2), ("uvloop", "lean", 2)],
)
async def test_sigterm_with_idle_keepalive_clients_exits_0_within_drain_timeout(
    tmp_path, upstreams, loop, http1_client, workers
):
    env = {"CANARY_NO_UVLOOP": "1" if loop == "asyncio" else ""}
    config = drain_config(tmp_path, upstreams, workers=workers, client=http1_client)
    proxy = await ServeProcess(config, env=env).start()
    clients = []
    try:
        for n in range(IDLE_CLIENTS):  # both arms' pools keep their upstream connections too
            clients.append(await idle_keepalive_connection(proxy.proxy_port, f"/v1/models?n={n}"))
        clients.append(await idle_keepalive_connection(proxy.admin_port, "/healthz"))
        clients.append(await asyncio.open_connection("127.0.0.1", proxy.proxy_port))  # never sent a byte
        proxy.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proxy.proc.wait(), DRAIN_TIMEOUT)
        assert code == 0, proxy.events[-5:]
        for reader, _ in clients:  # every idle connection was closed, not left hanging
            assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        for _, writer in clients:
            writer.close()
        await proxy.kill()
    assert [e["event"] for e in proxy.events if e.get("event") in ("draining", "stopped")] == ["draining", "stopped"]


async def test_closing_the_upstream_clients_also_closes_one_a_reload_replaced(upstreams, http1_client):
    """Stopping right after a reload: the replaced client, still waiting for its last
    request, must close its pooled connections too (not just be forgotten)."""
    canary = upstreams["canary"]
    first = Upstreams(
        baseline=upstream_settings("baseline", upstreams["baseline"], client=http1_client),
        canary=upstream_settings("canary", canary, client=http1_client),
    )
    clients = UpstreamClients(first)
    old = clients.transports["canary"]
    # two requests at once: two connections, both kept in the old client's pool afterwards
    answers = await asyncio.gather(*(old.send("GET", "/sleep/0.05", CIMultiDict(), None) for _ in range(2)))
    for answer in answers:
        assert answer.status == 200 and [chunk async for chunk in answer.iter_body()]
        await answer.aclose()
    hanging = asyncio.ensure_future(old.send("GET", "/hang", CIMultiDict(), None))
    await until(lambda: canary.app[STATS].inflight == 1, what="the request reaching the upstream")
    moved = replace(first.canary, url=upstream_url(upstreams["baseline"]))
    clients.replace(replace(first, canary=moved), drain=DRAIN_TIMEOUT)
    hanging.cancel()  # as the drained listener cancels its last handler...
    await clients.close()  # ...then closes the clients, at once
    with pytest.raises(asyncio.CancelledError):
        await hanging
    upstream = canary.runner.server
    await until(lambda: not upstream.connections, what="the replaced client's pooled connection to close")
