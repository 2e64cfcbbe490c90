"""`python scripts/benchmark.py --replicas`: three replicas sharing one rollout through Redis.

Starts Debian's `redis-server` (free port, no persistence), two small upstreams in this
process (the canary's error share can be switched on), and three real `canary serve`
replicas with `state.backend: redis`, then measures:

* Redis round trips per replica per second under load (every call the replica's Redis
  client makes, from /status `backend.round_trips`; the pub/sub push is not a round
  trip), against the ticks that reached Redis (`backend.exchanges`): the design is one
  pipelined round trip per `analysis.interval` (counts, state, lease renewal, heartbeat),
  plus a read of the history tail after a transition;
* the time from a canary starting to fail (30% errors) to EVERY replica serving weight 0
  (and to the first one), with the traffic spread over the three; several trials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bench_servers import free_port

REPO = Path(__file__).resolve().parent.parent

__all__ = ["ReplicaFigures", "measure_replicas", "print_replicas"]


@dataclass
class ReplicaFigures:
    interval: float
    seconds: float
    requests: int = 0
    round_trips_per_second: list[float] = field(default_factory=list)  # per replica
    exchanges_per_second: list[float] = field(default_factory=list)
    rollback_all_s: list[float] = field(default_factory=list)  # per trial
    rollback_first_s: list[float] = field(default_factory=list)
    paused: dict[str, Any] = field(default_factory=dict)  # the Redis-stopped scenario


class _Upstreams:
    def __init__(self) -> None:
        self.fail_every = 0  # canary: every Nth answer is a 500 (0: never)
        self._n = 0

    def app(self, name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            if name == "canary" and self.fail_every:
                self._n += 1
                if self._n % self.fail_every == 0:
                    return web.json_response({"error": "boom"}, status=500)
            return web.json_response({"arm": name})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def _config(workdir: Path, index: int, redis_url: str, ports: tuple[int, int], interval: str) -> Path:
    path = workdir / f"replica-{index}.yaml"
    path.write_text(f"""# written by scripts/bench_replicas.py
listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0", token: "bench"}}
upstreams:
  baseline: {{url: "http://127.0.0.1:{ports[0]}"}}
  canary: {{url: "http://127.0.0.1:{ports[1]}"}}
routing: {{sticky_key: ""}}
rollout: {{name: bench, stages: [50, 100], bake: 1h, min_requests: 20}}
analysis: {{interval: {interval}, window: 30s, min_requests: 20}}
state: {{path: "{workdir}/state-{index}.json", backend: redis, redis: {{url: "{redis_url}", key_prefix: bench}}}}
logging: {{level: info, format: json}}
""")
    return path


async def _serve(config: Path) -> tuple[asyncio.subprocess.Process, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(config), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        if not line:
            raise RuntimeError(f"canary serve exited ({config})")
        event = json.loads(line) if line.startswith(b"{") else {}
        if event.get("event") == "serving":
            asyncio.get_running_loop().create_task(_drain(proc.stderr))
            return proc, event["proxy"], event["admin"]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _status(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(f"{admin}/status") as response:
        return await response.json()


async def _load(session: aiohttp.ClientSession, proxies: list[str], stop: asyncio.Event, counter: list[int]) -> None:
    async def worker(url: str) -> None:
        while not stop.is_set():
            try:
                async with session.post(f"{url}/v1/chat", json={"m": 1}) as response:
                    await response.read()
                counter[0] += 1
            except aiohttp.ClientError:
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(url) for url in proxies for _ in range(8)))


async def _measure(
    workdir: Path, redis_url: str, interval: str, seconds: float, trials: int, pause: float, redis_pid: int
) -> ReplicaFigures:
    upstreams = _Upstreams()
    runners = []
    for name in ("baseline", "canary"):
        runner = web.AppRunner(upstreams.app(name), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
    ports = (runners[0].addresses[0][1], runners[1].addresses[0][1])
    procs = []
    figures = ReplicaFigures(interval=float(interval.rstrip("ms")) / (1000 if interval.endswith("ms") else 1), seconds=seconds)
    try:
        started = [await _serve(_config(workdir, i, redis_url, ports, interval)) for i in range(3)]
        procs = [p for p, _, _ in started]
        proxies, admins = [s[1] for s in started], [s[2] for s in started]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            stop, counter = asyncio.Event(), [0]
            load = asyncio.create_task(_load(session, proxies, stop, counter))
            await asyncio.sleep(2 * figures.interval)  # the load and the ticks settle
            before = [(await _status(session, a))["backend"] for a in admins]
            t0, requests0 = time.monotonic(), counter[0]
            await asyncio.sleep(seconds)  # measuring a span of time: this is the benchmark, not a test
            after = [(await _status(session, a))["backend"] for a in admins]
            span = time.monotonic() - t0
            figures.requests = counter[0] - requests0
            figures.round_trips_per_second = [round((b["round_trips"] - a["round_trips"]) / span, 3) for a, b in zip(before, after)]
            figures.exchanges_per_second = [round((b["exchanges"] - a["exchanges"]) / span, 3) for a, b in zip(before, after)]
            for _trial in range(trials):
                await _rollback_trial(session, admins, upstreams, figures)
            if pause:
                figures.paused = await _paused_trial(session, admins, upstreams, redis_pid, pause, redis_url)
            stop.set()
            await load
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        for runner in runners:
            await runner.cleanup()
    return figures


async def _rollback_trial(
    session: aiohttp.ClientSession, admins: list[str], upstreams: _Upstreams, figures: ReplicaFigures
) -> None:
    upstreams.fail_every = 0
    async with session.post(f"{admins[0]}/reset", json={"reason": "next trial"}, headers={"Authorization": "Bearer bench"}) as r:
        assert r.status == 200, await r.text()
    while {(await _status(session, a))["weight"] for a in admins} != {50}:
        await asyncio.sleep(0.02)
    await asyncio.sleep(2 * figures.interval)  # healthy evidence in the new stage first
    upstreams.fail_every = 3  # ~33% of canary answers fail from now on
    broken, first = time.monotonic(), None
    while True:
        weights = [(await _status(session, a))["weight"] for a in admins]
        if first is None and 0 in weights:
            first = time.monotonic() - broken
        if set(weights) == {0}:
            figures.rollback_all_s.append(round(time.monotonic() - broken, 3))
            figures.rollback_first_s.append(round(first or 0.0, 3))
            return
        await asyncio.sleep(0.01)


async def _paused_trial(
    session: aiohttp.ClientSession, admins: list[str], upstreams: _Upstreams, redis_pid: int, pause: float,
    redis_url: str,
) -> dict[str, Any]:
    """SIGSTOP Redis for `pause` s; the canary breaks 1 s in: each replica on its own."""
    upstreams.fail_every = 0
    async with session.post(f"{admins[0]}/reset", json={"reason": "pause trial"}, headers={"Authorization": "Bearer bench"}) as r:
        assert r.status == 200, await r.text()
    while {(await _status(session, a))["weight"] for a in admins} != {50}:
        await asyncio.sleep(0.02)
    os.kill(redis_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        await asyncio.sleep(1.0)
        upstreams.fail_every = 3
        broken, all_zero, weights_seen = time.monotonic(), None, set()
        while time.monotonic() - stopped < pause:
            weights = [(await _status(session, a))["weight"] for a in admins]
            weights_seen.update(weights)
            if all_zero is None and set(weights) == {0}:
                all_zero = round(time.monotonic() - broken, 3)
            await asyncio.sleep(0.05)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    resumed = time.monotonic()
    import redis as redis_client

    client = redis_client.Redis.from_url(redis_url, decode_responses=True)
    while json.loads(client.get("bench:bench:state") or "{}").get("state") != "rolled_back":
        await asyncio.sleep(0.02)
    recorded = round(time.monotonic() - resumed, 3)
    actions = [json.loads(item)["action"] for item in client.lrange("bench:bench:history", 0, -1)]
    since_reset = actions[len(actions) - actions[::-1].index("reset"):]
    return {
        "redis_stopped_s": pause, "broken_to_all_weight_0_s": all_zero, "weights_seen_while_stopped": sorted(weights_seen),
        "recorded_after_sigcont_s": recorded, "recorded_since_the_reset": since_reset,
    }


def measure_replicas(*, interval: str, seconds: float, trials: int, pause: float = 0.0) -> ReplicaFigures:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)  # redis-server starts in milliseconds; the first replica retries anyway
        with tempfile.TemporaryDirectory(prefix="canary-bench-replicas-") as tmp:
            url = f"redis://127.0.0.1:{port}/0"
            return asyncio.run(_measure(Path(tmp), url, interval, seconds, trials, pause, redis.pid))
    finally:
        redis.terminate()
        redis.wait()


def print_replicas(figures: ReplicaFigures) -> None:
    print(f"\nThree replicas on one Redis (analysis.interval {figures.interval:g}s, {figures.seconds:g}s of load, "
          f"{figures.requests / figures.seconds:,.0f} req/s over all)")
    print(f"  Redis round trips per replica per second: {figures.round_trips_per_second} "
          f"(ticks that reached Redis per second: {figures.exchanges_per_second}; budget: {1 / figures.interval:g} + lease renewals, which ride in the same pipeline)")
    print(f"  30% errors -> every replica at weight 0: {figures.rollback_all_s} s (first replica: {figures.rollback_first_s} s)")
    if figures.paused:
        print(f"  Redis SIGSTOPped: {figures.paused}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", default="1s", help="analysis.interval of the replicas (default 1s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load for the round-trip count")
    parser.add_argument("--trials", type=int, default=3, help="broken-canary trials (default 3)")
    parser.add_argument("--pause", type=float, default=10.0, help="seconds Redis is SIGSTOPped in the fault trial (0: none)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = measure_replicas(interval=args.interval, seconds=args.seconds, trials=args.trials, pause=args.pause)
    print_replicas(figures)
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
