"""`canary serve` as a real child process: start-up, drain on SIGTERM, memory, concurrency."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.admin_support import control_config, free_port, upstream_url
from tests.serve_process import ServeProcess, write_config
from tests.polling import until, until_async
from tests.upstreams import STATS, break_off_uploads

MB = 1024 * 1024


def serve_config(tmp_path: Path, upstreams, *, weight: int = 50, pool: int = 100, extra: str = "") -> Path:
    base, canary = upstream_url(upstreams["baseline"]), upstream_url(upstreams["canary"])
    return write_config(
        tmp_path / "canary.yaml",
        f"""
listen: "127.0.0.1:0"
drain_timeout: 10s
admin: {{listen: "127.0.0.1:0", token: "test-token"}}
upstreams:
  baseline: {{url: "{base}", pool: {{max_connections: {pool}, max_keepalive: 10}}}}
  canary: {{url: "{canary}", pool: {{max_connections: {pool}, max_keepalive: 10}}}}
rollout: {{weight: {weight}}}
analysis: {{interval: 100ms}}
logging: {{level: info, format: json}}
{extra}
""",
    )


@pytest.fixture
async def serve(tmp_path, upstreams):
    started: list[ServeProcess] = []

    async def start(**kwargs) -> ServeProcess:
        process = await ServeProcess(serve_config(tmp_path, upstreams, **kwargs)).start()
        started.append(process)
        return process

    yield start
    for process in started:
        await process.kill()


async def test_sigterm_drains_in_flight_requests_then_exits_0(serve, upstreams):
    proxy = await serve(weight=100)
    canary = upstreams["canary"].app[STATS]
    async with aiohttp.ClientSession() as client:
        async def one() -> tuple[int, str]:
            async with client.get(f"{proxy.proxy_url}/hang") as resp:
                return resp.status, await resp.text()
        requests = [asyncio.ensure_future(one()) for _ in range(20)]
        await until(lambda: canary.inflight == 20)
        proxy.proc.send_signal(signal.SIGTERM)
        await proxy.wait_for_event("draining")
        canary.release.set()
        results = await asyncio.gather(*requests)
    assert results == [(200, "canary released")] * 20
    code = await asyncio.wait_for(proxy.proc.wait(), 30)  # one SIGTERM is all it takes
    assert code == 0, proxy.events[-5:]
    assert [e["event"] for e in proxy.events if e.get("event") in ("draining", "stopped")] == ["draining", "stopped"]


async def test_200mb_upload_and_download_stream_without_buffering(serve):
    proxy = await serve(weight=100)
    size = 200 * MB
    peak = baseline_rss = proxy.rss()

    async def watch_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, proxy.rss())
            await asyncio.sleep(0.02)

    async def body():
        block = b"u" * (256 * 1024)
        for _ in range(size // len(block)):
            yield block

    watcher = asyncio.ensure_future(watch_rss())
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{proxy.proxy_url}/upload", data=body()) as resp:
                assert (await resp.json())["received"] == size
            received = 0
            async with client.get(f"{proxy.proxy_url}/download/{size}") as resp:
                async for chunk in resp.content.iter_chunked(1024 * 1024):
                    received += len(chunk)
            assert received == size
    finally:
        watcher.cancel()
    assert peak - baseline_rss < 20 * MB, f"proxy RSS grew by {(peak - baseline_rss) / MB:.1f} MB"


async def test_1000_concurrent_slow_requests_are_all_answered(serve):
    proxy = await serve(weight=50, pool=1200)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def one() -> int:
            async with client.get(f"{proxy.proxy_url}/sleep/1") as resp:
                await resp.read()
                return resp.status
        statuses = await asyncio.gather(*(one() for _ in range(1000)))
    assert statuses.count(200) == 1000



async def test_clients_that_break_off_uploads_are_not_counted_against_the_canary(serve, upstreams):
    proxy = await serve(weight=100)
    await break_off_uploads(proxy.proxy_port, upstreams["canary"].app[STATS])
    async with aiohttp.ClientSession() as client:
        async def canary_stage() -> dict:
            async with client.get(f"{proxy.admin_url}/status") as resp:
                return (await resp.json())["arms"]["canary"]
        arm = await until_async(canary_stage, lambda arm: arm["inflight"] == 0)
    assert arm["stage"]["errors"] == 0 and arm["errors"] == 0



async def test_a_second_serve_on_the_same_ports_fails_cleanly_and_keeps_the_token(tmp_path, upstreams):
    config = control_config(tmp_path / "canary.yaml", upstreams, token=None, admin_port=free_port())
    first = await ServeProcess(config).start()
    try:
        token_file = tmp_path / "var" / "admin.token"
        token = token_file.read_text()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), 20)
        assert second.returncode == 1 and b"cannot start" in err
        assert b"Traceback" not in err and b"Unclosed" not in err
        assert token_file.read_text() == token  # the running proxy's token still works
    finally:
        await first.kill()
