"""Measure the hardening figures of issue 11 against a real `canary serve` (default limits).

    python scripts/hardening_figures.py slowloris     # 300 half-sent heads; ~65 s (header_timeout 60s)
    python scripts/hardening_figures.py descriptors   # 1,500 concurrent requests at a 1,024 descriptor limit
    python scripts/hardening_figures.py config        # a 50 MB config edit while requests flow

Each prints one JSON object: what a user would see (statuses, latencies, times to close).
The upstream is a small aiohttp app in this process; everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

CONFIG = """listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0", token: "figures"}}
upstreams:
  baseline: {{url: "http://127.0.0.1:{port}"}}
  canary: {{url: "http://127.0.0.1:{port}"}}
rollout: {{weight: 50}}
state: {{path: "state.json"}}
logging: {{level: info, format: json}}
"""


async def _upstream() -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        delay = float(request.query.get("sleep", "0"))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    return runner, runner.addresses[0][1]


class Serve:
    def __init__(self, config: Path, preexec: Callable[[], None] | None = None) -> None:
        self.config, self.preexec = config, preexec
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Serve:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=self.preexec,
        )
        self._reader = asyncio.create_task(self._read())
        serving = await self.event("serving", timeout=30)
        self.proxy = serving["proxy"]
        self.admin = serving["admin"]
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                self.events.append({**json.loads(line), "seen_at": time.monotonic()})
            except ValueError:
                pass

    async def event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("event") == name:
                    return event
            await asyncio.sleep(0.01)
        raise RuntimeError(f"no {name} event in {timeout}s")

    async def __aexit__(self, *_: object) -> None:
        self.proc.terminate()
        await self.proc.wait()


def _ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50_ms": round(statistics.median(values) * 1000, 2), "max_ms": round(values[-1] * 1000, 2)}


async def _timed_gets(session: aiohttp.ClientSession, url: str, count: int) -> tuple[list[int], list[float]]:
    statuses, times = [], []
    for _ in range(count):
        start = time.monotonic()
        async with session.get(url) as response:
            await response.read()
        times.append(time.monotonic() - start)
        statuses.append(response.status)
    return statuses, times


async def slowloris(workdir: Path, port: int) -> dict[str, Any]:
    config = workdir / "canary.yaml"
    config.write_text(CONFIG.format(port=port))
    async with Serve(config) as serve:
        proxy_port = int(serve.proxy.rsplit(":", 1)[1])
        started = time.monotonic()

        async def one(index: int) -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            closed = asyncio.ensure_future(reader.read())
            while index % 2 and not closed.done():  # half of them: a byte a second
                writer.write(b"X")
                await asyncio.wait([closed], timeout=1.0)
            answer = await closed
            writer.close()
            return time.monotonic() - started, answer

        attackers = [asyncio.ensure_future(one(i)) for i in range(300)]
        async with aiohttp.ClientSession() as session:
            statuses, times = await _timed_gets(session, f"{serve.proxy}/normal", 200)
        closed = await asyncio.gather(*attackers)
    seconds = [at for at, _ in closed]
    return {
        "slowloris_connections": 300, "closed": len(closed),
        "answered_408": sum(answer.startswith(b"HTTP/1.1 408") for _, answer in closed),
        "closed_after_s": {"min": round(min(seconds), 2), "max": round(max(seconds), 2)},
        "normal_requests_meanwhile": dict(Counter(statuses)), "normal_latency": _ms(times),
    }


async def descriptors(workdir: Path, port: int) -> dict[str, Any]:
    config = workdir / "canary.yaml"
    config.write_text(CONFIG.format(port=port))

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    async with Serve(config, lower) as serve:
        limit = await serve.event("descriptor_limit")
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            async def one() -> str:
                try:
                    async with session.get(f"{serve.proxy}/slow?sleep=0.5") as response:
                        await response.read()
                        return f"{response.status}"
                except aiohttp.ClientError as exc:
                    return type(exc).__name__
            start = time.monotonic()
            outcomes = Counter(await asyncio.gather(*(one() for _ in range(1500))))
            elapsed = time.monotonic() - start
            async with session.get(f"{serve.admin}/status") as response:
                arms = (await response.json())["arms"]
            async with session.get(f"{serve.admin}/metrics") as response:
                shed = [line for line in (await response.text()).splitlines() if line.startswith("canary_shed_total{")]
    return {
        "descriptor_limit": {"soft": limit["soft"], "hard": limit["hard"]},
        "max_connections": (await serve.event("serving"))["max_connections"],
        "requests": 1500, "outcomes": dict(outcomes), "seconds": round(elapsed, 2),
        "arm_errors": {arm: arms[arm]["errors"] for arm in arms}, "shed": shed,
    }


async def big_config(workdir: Path, port: int) -> dict[str, Any]:
    config = workdir / "canary.yaml"
    good = CONFIG.format(port=port)
    config.write_text(good)
    async with Serve(config) as serve, aiohttp.ClientSession() as session:
        _, before = await _timed_gets(session, f"{serve.proxy}/before", 200)
        tmp = config.with_name("canary.yaml.tmp")
        tmp.write_text(good + "# " + "x" * (50 * 1024 * 1024) + "\n")
        written = time.monotonic()
        os.replace(tmp, config)
        during: list[float] = []
        while not any(e.get("event") == "config_rejected" for e in serve.events):
            _, times = await _timed_gets(session, f"{serve.proxy}/during", 1)
            during += times
        rejected = next(e for e in serve.events if e.get("event") == "config_rejected")
    return {
        "config_bytes": 50 * 1024 * 1024 + len(good) + 3,
        "rejected_after_s": round(rejected["seen_at"] - written, 3),
        "detail": rejected["problems"][0].split(": ", 2)[-1],
        "latency_before": _ms(before), "latency_during": _ms(during), "requests_during": len(during),
    }


async def main(which: str) -> None:
    runner, port = await _upstream()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            measure = {"slowloris": slowloris, "descriptors": descriptors, "config": big_config}[which]
            print(json.dumps(await measure(Path(workdir), port), indent=1))
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=("slowloris", "descriptors", "config"))
    asyncio.run(main(parser.parse_args().which))
