"""Measure what protecting users costs and buys (README "Protecting users", CONTRACT §8).

    python scripts/measure_protect.py              # all three, ~1 minute
    python scripts/measure_protect.py --only shadow

* fallback: a canary failing 30% of its calls with 503 at weight 50, 2,000 client
  requests (16 at a time), with `routing.fallback` on and off: the errors clients saw and
  how many canary requests it took to roll back (the same evidence either way);
* fallback-held: the same canary held at weight 50 (`on_critical: pause`), so all 2,000
  requests are split: the errors clients saw, and how many the baseline answered instead;
* shadow: a canary that never answers, in `shadow` (copies of every GET) against no shadow
  at all: the clients' p50/p99 over 2,000 requests, and the copies dropped.

The real `canary serve` runs as a child process; the upstreams (tiny aiohttp apps) and the
clients run in this process, all on 127.0.0.1. Overheads with nothing failing are in
`scripts/benchmark.py --fallback-compare`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REQUESTS = 2000
CONCURRENCY = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upstream_app(name: str, *, fail_ratio: float = 0.0, hang: bool = False) -> web.Application:
    """Answers a small JSON body; `fail_ratio` of the calls (evenly spread) answer 503;
    `hang`: never answers."""
    state = {"hits": 0, "failed": 0}
    released = asyncio.Event()  # set at clean-up: a hung call ends before its server goes

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        state["hits"] += 1
        if hang:
            await released.wait()
        if fail_ratio and int(state["hits"] * fail_ratio) > state["failed"]:
            state["failed"] += 1
            return web.json_response({"error": f"{name} overloaded"}, status=503)
        return web.json_response({"arm": name, "ok": True})

    async def release(_app: web.Application) -> None:
        released.set()

    app = web.Application()
    app.on_shutdown.append(release)
    app["state"] = state
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def write_config(directory: Path, baseline: int, canary: int, *, routing: str, rollout: str, analysis: str) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    path = directory / f"canary-{port}.yaml"
    path.write_text(f"""
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin}", token: "m"}}
upstreams:
  baseline: {{url: "http://127.0.0.1:{baseline}", pool: {{max_connections: 64, max_keepalive: 64}}}}
  canary: {{url: "http://127.0.0.1:{canary}", timeout: {{total: 30s}}, pool: {{max_connections: 8, max_keepalive: 8}}}}
routing: {{sticky_key: "", {routing}}}
rollout: {{stages: [50, 100], bake: 1h, min_requests: 20, {rollout}}}
analysis: {{window: 30s, interval: 50ms, min_requests: 20, {analysis}}}
state: {{path: "{directory}/state-{port}.json"}}
logging: {{level: error}}
""")
    return path, port, admin


async def start_proxy(config: Path, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("canary serve did not start")


async def stop_proxy(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    await proc.wait()


async def drive(port: int, *, method: str = "GET") -> dict[str, Any]:
    """REQUESTS requests, CONCURRENCY at a time: statuses, latencies, fallbacks."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    fallbacks = 0
    remaining = REQUESTS
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker() -> None:
            nonlocal remaining, fallbacks
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with client.request(method, url, json={"model": "m"} if method == "POST" else None) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - started)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                fallbacks += "X-Canary-Fallback" in resp.headers

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    latencies.sort()
    return {
        "statuses": statuses,
        "client_errors": sum(n for status, n in statuses.items() if status >= 500),
        "fallbacks": fallbacks,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


async def admin_get(admin: int, path: str) -> Any:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{admin}{path}") as resp:
            return await resp.json() if path != "/metrics" else await resp.text()


async def one_run(workdir: Path, *, canary: dict[str, Any], routing: str, rollout: str, analysis: str, method: str = "GET") -> dict[str, Any]:
    base_runner, base_port = await serve(upstream_app("baseline"))
    canary_runner, canary_port = await serve(upstream_app("canary", **canary))
    config, port, admin = write_config(workdir, base_port, canary_port, routing=routing, rollout=rollout, analysis=analysis)
    proc = await start_proxy(config, port)
    try:
        result = await drive(port, method=method)
        status = await admin_get(admin, "/status")
        metrics = await admin_get(admin, "/metrics")
    finally:
        await stop_proxy(proc)
        await base_runner.cleanup()
        await canary_runner.cleanup()
    rollback = next((t for t in status["history"] if t["action"] == "rollback"), None)
    result["state"] = status["state"]
    result["canary_requests_at_rollback"] = rollback["evidence"]["canary"]["requests"] if rollback else None
    result["baseline_hits"] = base_runner.app["state"]["hits"]
    result["dropped"] = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("canary_shadow_dropped_total{")
    )
    return result


async def fallback(workdir: Path, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            runs[mode].append(await one_run(
                workdir, canary={"fail_ratio": 0.3}, routing=f"fallback: {{enabled: {str(mode == 'on').lower()}}}",
                rollout="weight: 50", analysis="", method="POST",
            ))
    return runs


async def fallback_held(workdir: Path) -> dict[str, Any]:
    return await one_run(
        workdir, canary={"fail_ratio": 0.3}, routing="fallback: {enabled: true}", rollout="weight: 50",
        analysis="on_warning: pause, on_critical: pause", method="POST",
    )


async def shadow(workdir: Path, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"shadow": [], "no shadow": []}
    latency = "latency: {p95_warning: 1m, p99_critical: 2m}"
    for _ in range(rounds):
        runs["no shadow"].append(await one_run(workdir, canary={"hang": True}, routing="", rollout="weight: 0", analysis=latency))
        runs["shadow"].append(await one_run(workdir, canary={"hang": True}, routing="", rollout="shadow: 1h", analysis=latency))
    return runs


def report(name: str, data: Any) -> None:
    print(f"== {name}")
    print(json.dumps(data, indent=1))


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="canary-protect-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "fallback"):
            runs = await fallback(workdir, args.rounds)
            report("fallback: canary 30% 503 at weight 50, rollout.weight 50, on_critical rollback", runs)
            for mode, results in runs.items():
                print(f"fallback {mode}: client errors {[r['client_errors'] for r in results]}, "
                      f"canary requests at rollback {[r['canary_requests_at_rollback'] for r in results]}")
            held = await fallback_held(workdir)
            report("fallback held at weight 50 (on_critical: pause)", held)
        if args.only in (None, "shadow"):
            runs = await shadow(workdir, args.rounds)
            report("shadow: a hung canary", runs)
            for mode, results in runs.items():
                print(f"{mode}: p99 ms {[r['p99_ms'] for r in results]} (median "
                      f"{statistics.median(r['p99_ms'] for r in results)}), p50 ms {[r['p50_ms'] for r in results]}, "
                      f"dropped {[r['dropped'] for r in results]}, client errors {[r['client_errors'] for r in results]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("fallback", "shadow"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per setting (default 3)")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
