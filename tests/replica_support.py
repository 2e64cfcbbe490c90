"""Replicas sharing one rollout through a real redis-server: configs and traffic."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from config.loader import load_settings
from proxy.front.server import CanaryServer
from tests.serve_process import write_config

__all__ = ["redis_config", "replicas", "spread_traffic"]


def redis_config(config: Path, redis_url: str, *, name: str = "shop", workers: int = 1) -> Path:
    """`config` with the Redis backend (and its own state file, unused) appended."""
    text = config.read_text()
    extra = f"\nstate: {{backend: redis, redis: {{url: \"{redis_url}\", key_prefix: t, timeout: 300ms}}}}\n"
    text = text.replace("rollout: {", f"rollout: {{name: {name}, ", 1) + extra
    if workers > 1:
        text = f"workers: {workers}\n" + text
    return write_config(config.with_name(f"{config.stem}-{workers}w.yaml") if workers > 1 else config, text)


@contextlib.asynccontextmanager
async def replicas(*configs: Path) -> AsyncIterator[list[CanaryServer]]:
    servers = [CanaryServer(load_settings(config)) for config in configs]
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await server.start()
            stack.push_async_callback(server.stop)
        yield servers


@contextlib.asynccontextmanager
async def spread_traffic(urls: list[str], *, concurrency: int = 4) -> AsyncIterator[list[int]]:
    """Requests to every URL in turn from `concurrency` loops per URL until the block ends."""
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        async def worker(url: str) -> None:
            while True:
                try:
                    async with client.post(url, json={"model": "m"}) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                except aiohttp.ClientError:
                    statuses.append(0)
                    await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(worker(url)) for url in urls for _ in range(concurrency)]
        try:
            yield statuses
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
