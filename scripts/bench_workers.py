"""`python scripts/benchmark.py --workers-compare`: one worker against two, on this machine.

The real `canary serve --workers N` (N = 1, then 2; weight 50, analysis every second,
the given HTTP/1.1 client) in front of the benchmark's fixed upstream, loaded in
interleaved rounds at `--connections` keep-alive connections. Nothing is pinned: two
workers need both cores, and the load generator and the upstream share them, as they
would share a real machine. Per row:

* req/s (best round) and p50/p99;
* CPU time per request of the whole proxy (supervisor + workers, from /proc), and so
  req/s per core of proxy CPU — the figure that does not depend on who else ran;
* how the requests spread over the workers (from /status), for the keep-alive load and
  for a burst of fresh connections.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench_load import LoadResult, batch
from bench_servers import Children, canary_command, canary_config, cpu_seconds, free_port

__all__ = ["WorkersRow", "compare_workers", "print_workers"]

FRESH_CONNECTIONS = 1000


@dataclass
class WorkersRow:
    workers: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_request: float = 0.0
    rps_per_core: float = 0.0
    keepalive_spread: list[int] = field(default_factory=list)  # requests per worker
    fresh_spread: list[int] = field(default_factory=list)  # of FRESH_CONNECTIONS new connections
    errors: int = 0


@dataclass
class _Instance:
    workers: int
    url: str
    admin: str
    pid: int
    runs: list[tuple[LoadResult, float]] = field(default_factory=list)


def compare_workers(
    children: Children, workdir: Path, *, upstream: tuple[int, int], client: str,
    load: Callable[[str, int, float], LoadResult], connections: int, seconds: float, rounds: int,
) -> list[WorkersRow]:
    instances = [_start(children, workdir, n, upstream, client) for n in (1, 2)]
    for instance in instances:
        load(instance.url, connections, 1)  # warm up
    for _ in range(rounds):
        for instance in instances:
            before = cpu_seconds(instance.pid)
            result = load(instance.url, connections, seconds)
            cpu = (cpu_seconds(instance.pid) - before) / max(1, result.requests)
            instance.runs.append((result, cpu))
    rows = []
    for instance in instances:
        keepalive = _served(instance)
        asyncio.run(batch(instance.url, FRESH_CONNECTIONS))
        fresh = [after - before for before, after in zip(keepalive, _served(instance))]
        rows.append(_row(instance, keepalive, fresh))
        children.stop_pid(instance.pid)
    return rows


def _start(children: Children, workdir: Path, workers: int, upstream: tuple[int, int], client: str) -> _Instance:
    port, admin = free_port(), free_port()
    name = f"canary-workers-{workers}"
    conf = canary_config(
        workdir, name, port=port, admin_port=admin, baseline=f"http://127.0.0.1:{upstream[0]}",
        canary=f"http://127.0.0.1:{upstream[1]}", analysis_interval="1s", pool=1000,
    )
    command = [*canary_command(conf), "--workers", str(workers)]
    proc = children.start(name, command, core=None, env={"CANARY_HTTP1_CLIENT": client})
    children.wait_listening(proc, port)
    children.wait_listening(proc, admin)
    return _Instance(workers, f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{admin}", proc.pid)


def _served(instance: _Instance) -> list[int]:
    """Requests each worker served so far. Workers report once per analysis.interval
    (1 s here): wait for two reports so the newest counts are in."""
    time.sleep(2.2)
    if instance.workers == 1:
        with urllib.request.urlopen(f"{instance.admin}/metrics", timeout=10) as response:
            text = response.read().decode()
        return [round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("canary_requests_total{")))]
    with urllib.request.urlopen(f"{instance.admin}/status", timeout=10) as response:
        status: dict[str, Any] = json.load(response)
    return [worker["requests"] for worker in status["workers"]]


def _row(instance: _Instance, keepalive: list[int], fresh: list[int]) -> WorkersRow:
    best, _cpu = max(instance.runs, key=lambda run: run[0].rps)
    cpu = min(cpu for _result, cpu in instance.runs)
    return WorkersRow(
        workers=instance.workers,
        rps=round(best.rps),
        p50_ms=round(best.p50 * 1000, 2),
        p99_ms=round(best.p99 * 1000, 2),
        cpu_us_per_request=round(cpu * 1e6, 1),
        rps_per_core=round(1 / cpu) if cpu else 0,
        keepalive_spread=keepalive,
        fresh_spread=fresh,
        errors=sum(result.errors for result, _ in instance.runs),
    )


def print_workers(rows: list[WorkersRow]) -> None:
    print("\nWorkers on one machine (canary serve --workers N; load generator and upstream share the cores)")
    print(f"{'workers':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>10} {'req/s per core':>14}  spread (keep-alive | fresh connections)")
    for row in rows:
        print(
            f"{row.workers:>7} {row.rps:>8,.0f} {row.p50_ms:>7} {row.p99_ms:>7} {row.cpu_us_per_request:>10} "
            f"{row.rps_per_core:>14,.0f}  {row.keepalive_spread} | {row.fresh_spread}"
            + (f"  errors: {row.errors}" if row.errors else "")
        )
    if len(rows) == 2 and rows[0].cpu_us_per_request:
        ratio = rows[1].cpu_us_per_request / rows[0].cpu_us_per_request
        print(f"CPU per request, 2 workers vs 1: {ratio:.2f}× (target: within 10%)")
        print(f"throughput, 2 workers vs 1: {rows[1].rps / max(1, rows[0].rps):.2f}×")
